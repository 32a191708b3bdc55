"""Video sampling (launch with torchrun or python; see examples/quickstart/run.sh)."""

from mm.inference.runner import inference

if __name__ == "__main__":
    inference()
