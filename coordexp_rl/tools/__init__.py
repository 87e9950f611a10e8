"""Commands and measurements on top of everything else: infer, bench, ablate, the GPU check."""
