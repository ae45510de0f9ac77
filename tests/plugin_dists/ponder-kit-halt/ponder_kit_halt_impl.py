from ponder.contracts.halting import HaltingRule


class Halving(HaltingRule):
    """Each layer takes half of the halting weight still left when its unit fires: ``p = sigmoid(.) * (1 - cum) / 2``,
    with a depth cost.

    Args:
        d_model: model width (supplied by ponder).
        n_layers: number of layers (supplied by ponder).
        cost: weight of the mean token depth in the loss.
        bias_init: initial bias of the halting units.
    """

    weighted_output = True  # the output is the halting-weighted mean of the states, as ACT's

    def __init__(self, d_model, n_layers, cost=0.01, bias_init=0.0):
        super().__init__(d_model, n_layers, bias_init)
        self.cost = cost

    def mass(self, s, layer, cum):
        return self.probability(s, layer) * (1.0 - cum) * 0.5

    def loss(self, state):
        return self.cost * state.depth.mean()
