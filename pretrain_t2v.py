"""Text-to-video pre-training (launch with torchrun; see examples/*/t2v/pretrain_t2v.sh)."""

from mm.training.pretrain import pretrain

if __name__ == "__main__":
    pretrain()
