"""Reading checkpoint files without running code from them.

A plain torch.load with weights_only off, as DeepSpeed calls it for its shards, unpickles
arbitrary objects: a checkpoint from elsewhere could run code. Inside `weights_only_loads()` every
torch.load (kiln's, and DeepSpeed's own in load_checkpoint and zero_to_fp32) runs with
weights_only=True, which builds only tensors, containers, numbers and strings, plus the few plain
data classes listed below that DeepSpeed's and kiln's files hold. A file that needs anything else, or that cannot be read
(truncated, corrupted), fails naming the file; it is never loaded, and the run never starts over
in its place.
"""

from __future__ import annotations

import contextlib
import pickle
import zipfile

import torch

from kiln.errors import DataError

# Plain data DeepSpeed pickles into its shards (no __reduce__ tricks, no __setstate__ code):
# loss-scaler settings, the ZeRO stage enum, the address of a parameter's fragment.
DEEPSPEED_DATA = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                  "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                  "deepspeed.runtime.zero.config.ZeroStageEnum",
                  "deepspeed.utils.tensor_fragment.fragment_address")


def _allowed() -> list:
    import importlib

    import numpy as np

    found = []
    for dotted in DEEPSPEED_DATA:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: its files will say what they need
            pass
    # numpy arrays (the RNG state of checkpoints kiln wrote before it stored that as a tensor):
    # _reconstruct only allocates an array whose bytes come from the file.
    core = getattr(np, "_core", None) or np.core
    found += [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return found


@contextlib.contextmanager
def weights_only_loads():
    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise DataError(f"checkpoint file {f} holds objects kiln does not load ({reason}); nothing in it "
                            f"was run. Use a checkpoint kiln or DeepSpeed wrote, or resume from an earlier one"
                            ) from None
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"checkpoint file {f} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is "
                            f"damaged or incomplete. Resume from an earlier checkpoint (trainer.resume_from) "
                            f"or restore the file") from None

    with torch.serialization.safe_globals(_allowed()):
        torch.load = load
        try:
            yield
        finally:
            torch.load = real
