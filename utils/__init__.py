"""memsharp utilities: model loading, score/HVP math, detection, SAIL, eigen-solvers, metrics, prompt files, I/O."""
