"""The peer engines, llama.cpp and LiteRT-LM: building, converting and reading their files."""
