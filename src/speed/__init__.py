"""Speed machinery kept out of the model and the trainer: backbone fusion (``fuse``), batches gathered from an
image cache in device memory (``device_cache``) and two CUDA streams for the two backbones (``streams``); the
benchmark in src/tools/bench/ measures them. See README.md beside this file."""
