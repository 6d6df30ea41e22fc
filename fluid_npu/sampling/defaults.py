"""The sampler's defaults that its command lines show, in a module that imports nothing: building
``fluid``'s parser (``--help``, a mistyped flag) then loads no torch (``fused.py`` says what they
mean)."""

DEFAULT_ANCHORS = 2  # candidate blocks per row and step at most
DEFAULT_COVERAGE = 0.9  # the accept-length probability the candidate blocks cover
