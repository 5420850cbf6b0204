"""Where a batch job runs: :mod:`detect.engines.local` (this process) and :mod:`detect.engines.ray` (a Ray
cluster, Ray Data). Every engine loads and runs models through :mod:`detect.inference` and writes through
:mod:`detect.engines.outputs`, so both write the same outputs."""
