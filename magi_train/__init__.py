"""magi: train and serve MAGI-1-class autoregressive video diffusion models."""

import warnings

# megatron-core warns on every import that the GPU-only Transformer Engine / Apex are absent and that it
# falls back to torch; on CPU that is the expected configuration, and the noise hides real warnings.
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*", category=UserWarning)
