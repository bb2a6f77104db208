"""The shipped VLM organism `builtin:shapes-vlm`: a procedurally rendered world of coloured icons (`world`), the
model and its processor (`model`), the deterministic training script (`train`) and the generator of the
shapes-POPE / shapes-CHAIR benchmark files (`build_benchmarks`). Recipe: shared/specs/organism.md, recipe F."""
