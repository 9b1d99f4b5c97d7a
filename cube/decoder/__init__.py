"""Answer generation: a frozen causal language model that writes the answer whose embedding it is
given (`EmbeddingDecoder`), trained by reconstruction (`cube decoder`), scored by `generation`."""

from cube.decoder.model import DecoderConfig, EmbeddingDecoder, load_decoder

__all__ = ["DecoderConfig", "EmbeddingDecoder", "load_decoder"]
