import os

import torch

# Deterministic, quiet CPU runs: two cores, no oversubscription between torch and BLAS.
torch.set_num_threads(min(2, os.cpu_count() or 1))
