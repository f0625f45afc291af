"""The process layer: topology (flags, torchrun, Slurm) → argv for torchrun | deepspeed | accelerate. Imports no torch."""
