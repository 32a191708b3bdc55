"""Feature extraction: the VAE latents and text embeddings of a data JSON's videos, written once for
training with ``dataset_type: feature`` (launch with torchrun or python; see docs/features.md)."""

from mm.accelerator.notices import quiet_known_notices

quiet_known_notices()  # before megatron-core and torch are imported (MM_VERBOSE=1 or --verbose: rank 0 shows them)

from mm.training.extract_features import main  # noqa: E402

if __name__ == "__main__":
    main()
