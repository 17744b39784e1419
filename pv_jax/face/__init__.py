"""dlib's face-recognition ResNet in JAX: weights reader, network, differentiable face chips and
the identity loss/similarity used for PhotoVerse's L_face and for evaluation."""

from pv_jax.face.align import (
    ChipDetails,
    align_faces,
    chip_transform,
    face_chip_details,
)
from pv_jax.face.dlib_format import (
    NUM_PARAMS,
    DlibFaceNet,
    default_weights_path,
    read_face_resnet,
)
from pv_jax.face.identity import (
    cosine_similarity,
    descriptor_cosine,
    identity_loss,
    identity_similarity_chips,
    unit_rows,
)
from pv_jax.face.resnet import FaceResNet, load_dlib_face_net

__all__ = [
    "NUM_PARAMS",
    "ChipDetails",
    "DlibFaceNet",
    "FaceResNet",
    "align_faces",
    "chip_transform",
    "cosine_similarity",
    "descriptor_cosine",
    "default_weights_path",
    "face_chip_details",
    "identity_loss",
    "identity_similarity_chips",
    "unit_rows",
    "load_dlib_face_net",
    "read_face_resnet",
]
