"""Where a batch job runs: :mod:`detect.engines.local` (this process). Every engine loads and runs models through
:mod:`detect.inference` and writes the same outputs."""
