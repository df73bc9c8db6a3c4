"""Layer modules of avalon-layers (avalon.nn.*)."""
