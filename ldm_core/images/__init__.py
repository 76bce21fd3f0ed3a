"""What is measured on or drawn from finished images: fidelity metrics and image grids."""
