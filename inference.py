"""Video sampling (launch with torchrun or python; see examples/quickstart/run.sh)."""

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core and torch are imported (MM_VERBOSE=1 or --verbose: rank 0 shows them)

from mm.inference.runner import inference  # noqa: E402

if __name__ == "__main__":
    inference()
