"""Example Flower App for bcsfl-flower: MNIST and CIFAR-10 with PyTorch under BCSFL."""
