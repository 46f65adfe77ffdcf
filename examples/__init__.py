"""zsgd's examples; a package so that ``--model torch:examples.torch.resnet:make`` imports from the repository root."""
