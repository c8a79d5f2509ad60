"""TensorRT 10.x: the build-time check (`toolchain build --check`), engine build and refit, the engine
sidecar record. Everything imports ``tensorrt`` lazily; where it is missing the commands say so and
how to get it. Written against TensorRT 10.3 (JetPack 6.x on the Jetson Orin Nano)."""
