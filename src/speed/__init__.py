"""Speed machinery kept out of the model and the trainer: backbone fusion (``fuse``), batches gathered from an
image cache in device memory (``device_cache``), two CUDA streams for the two backbones (``streams``) and the
benchmark that measures them (``python -m src.speed.bench``). See README.md beside this file."""
