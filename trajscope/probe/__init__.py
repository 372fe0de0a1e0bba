"""Probing one pair (t, t+1): re-evaluating the loss on the step's minibatch along the line between
x_t and x_{t+1}, and reducing what it finds to the numbers the metrics read."""
