"""Everything that turns a `--data` spec into batches: image files, sources, crops, loaders, the built-in shapes."""
