"""GPU servers and their GPUs: ``models``, ``enrolment`` (join and node tokens),
``heartbeat`` (ingesting an agent's report in set-based statements), ``gpu_state`` (the one
function naming a GPU's state), ``inventory`` and ``filters``; ``agent/`` is the program
that runs on each server (no Django: an import-linter contract keeps it so). A change of
capacity is announced through ``kernel.events.capacity_changed``, not by calling up."""
