"""pytest plugin for the GPU check (`-p benchmarks.first_config_autotune`): every Triton autotuner keeps
only its first config, so the correctness tests compile one kernel per specialization instead of every
config (the goal benchmarks autotune over all of them)."""
from benchmarks.gpu_goals import limit_autotune

limit_autotune(lambda configs: configs[:1])
