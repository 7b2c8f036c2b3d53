"""trajflow_t2i: text-to-image Normalizing Trajectory Models built from trajflow components."""
