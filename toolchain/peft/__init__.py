"""Parameter-efficient fine-tuning for convs: config, layers, injection, adapter I/O."""
