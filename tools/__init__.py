"""Stage tools of the ImageNet pipeline: each module is a CLI (`python -m tools.<stage> --help`)."""
