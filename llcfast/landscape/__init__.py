"""The landscape between solutions: the loss along paths between weight
sets, and the permutation alignment of hidden units that connects them."""
