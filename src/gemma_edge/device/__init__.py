"""What runs on a device, uploaded to it whole: the .pte runtime, the timing loop, the peers' runs
there, bandwidth, ELF reading and atomic files. The host runs the same code for its own target.
Imports only the standard library, torch, executorch (with its tokenizers), litert_lm and itself."""
