"""Turn the pickled weight files of a model folder into safetensors: ``python -m dp3d_core.convert_pickles FOLDER``.

Model folders load safetensors only (a pickle can run code when it is loaded). A folder written by an older
tool may hold ``diffusion_pytorch_model.bin`` instead; this reads each such file with
``torch.load(weights_only=True)`` (which refuses anything but tensors and plain containers) and writes
``diffusion_pytorch_model.safetensors`` beside it. The pickles are left in place; delete them once the model
loads.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

from .preflight import NETWORK_FOLDERS, PICKLE_SUFFIXES


def convert_folder(folder: str | os.PathLike) -> list[Path]:
    """Write a .safetensors beside every pickled weight file of the components that lack one; the paths written."""
    import torch
    from safetensors.torch import save_file

    written = []
    for name in NETWORK_FOLDERS:
        sub = Path(folder) / name
        if not sub.is_dir() or any(sub.glob("*.safetensors")):
            continue
        for pickle in sorted(p for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES):
            state = torch.load(str(pickle), map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"{pickle} does not hold a plain name -> tensor dictionary")
            target = pickle.with_suffix(".safetensors")
            tmp = target.with_name(f".{target.name}.tmp")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            os.replace(tmp, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp3d_core.convert_pickles", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the model folder (holds model_index.json)")
    args = parser.parse_args(argv)
    try:
        written = convert_folder(args.folder)
    except pickle.UnpicklingError:
        print("error: a weight file holds more than tensors (weights_only=True refused it); it is not converted, "
              "get the model from a source you trust in safetensors form", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: cannot convert: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"{len(written)} file(s) written" if written else "nothing to convert (every component has safetensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
