import torch


class CountedSGD(torch.optim.SGD):
    """SGD with momentum that counts its steps and reports them as metrics.

    Args:
        params: the parameters (supplied by ponder).
        lr: learning rate.
        momentum: momentum factor.
    """

    def __init__(self, params, lr=0.05, momentum=0.9):
        super().__init__(params, lr=lr, momentum=momentum)
        self.steps_taken = 0

    def step(self, closure=None):
        self.steps_taken += 1
        return super().step(closure)

    def metrics(self):
        return {"steps_taken": self.steps_taken}
