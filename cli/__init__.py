"""gpuctl: the command-line client of the GPU portal (HTTP only, standard library only)."""
