"""Video VAE training (launch with torchrun or python; see examples/quickstart/run.sh)."""

from mm.training.pretrain_vae import pretrain_vae

if __name__ == "__main__":
    pretrain_vae()
