"""fluid-npu: adapt a pretrained causal LM into a lossless parallel-decoding diffusion LM (FLUID).

Stage I (strictly causal alignment), Stage II (the K-head for elastic horizons) and the elastic
sampler, on Ascend NPUs, CUDA and CPU with one code path. See DESIGN.md in the team's shared notes
and the README for the tour.
"""

__version__ = "0.1.0"
