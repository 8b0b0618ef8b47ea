"""Build step of the image: compile specattn's GPU kernels for the target architecture without a GPU.

FlashInfer compiles each kernel variant with nvcc on first use and caches it under
$FLASHINFER_WORKSPACE_BASE; doing that here, for $FLASHINFER_CUDA_ARCH_LIST (9.0a: H100/H200), saves
the first requests minutes. The kernels package names its variants: it exposes `precompile()`, which
builds them all. Until it does (or when the kernels cannot be built here), this step says so and the
server compiles on first use into the same cache, which compose keeps in a volume.
"""

import os
import sys
import traceback

arch = os.environ.get("FLASHINFER_CUDA_ARCH_LIST", "")
try:
    import specattn.kernels as kernels
except Exception:  # the image must still build: the kernels compile on first use instead
    traceback.print_exc()
    sys.exit(0)
precompile = getattr(kernels, "precompile", None)
if precompile is None:
    print(f"specattn.kernels has no precompile(); kernels for {arch or 'this GPU'} compile on first use")
    sys.exit(0)
try:
    precompile()
    print(f"precompiled specattn kernels for {arch} into {os.environ.get('FLASHINFER_WORKSPACE_BASE')}")
except Exception:
    traceback.print_exc()
    print("kernel precompilation failed; they compile on first use", file=sys.stderr)
