"""Generated from ../locoswarm.proto by ``python -m locoswarm.protocol.codegen``."""
