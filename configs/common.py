"""What the configs share: the argument after the config file's colon, parsed big_vision's way.

python train_tpu.py --config configs/photoverse_sdxl.py:tiny,image_source=both
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
    """``"tiny,fsdp=2,image_source=both"`` over the defaults ``spec``: a bare name sets a bool
    option True, a value takes its default's type (a default of None keeps the text's int or
    str); an unknown name, a bare non-bool name or a bool that is not true/false is a
    ValueError naming it."""
    out = ml_collections.ConfigDict(spec)
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        name, eq, text = part.partition("=")
        if name not in spec:
            raise ValueError(
                f"config argument {part!r}: unknown name {name!r}; known: {', '.join(spec)}"
            )
        default = spec[name]
        if not eq:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {part!r}: give {name} a value ({name}=...)")
            value = True
        elif isinstance(default, bool):
            if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config argument {part!r}: {name} is true or false")
            value = text.lower() in ("1", "true", "yes")
        elif default is None:
            value = int(text) if text.lstrip("-").isdigit() else text
        else:
            value = type(default)(text)
        with out.ignore_type():
            out[name] = value
    return out
