"""strm library: manifests, decoding, backbones, the feature cache, STRM heads, training and evaluation.

Nothing in this package prints, exits or parses arguments; `stages` does the talking.
"""
