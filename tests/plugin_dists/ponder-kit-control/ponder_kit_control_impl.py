from ponder.contracts.controllers import Controller


class EventCounter(Controller):
    """Counts every event it sees and nudges the RoPE base up after each evaluation.

    Args:
        nudge: factor applied to the rope_base dial after each evaluation.
    """

    def __init__(self, nudge=1.01):
        self.nudge = nudge
        self.counts = {}

    def _count(self, event):
        self.counts[event.name] = self.counts.get(event.name, 0) + 1

    on_train_start = after_backward = after_step = _count

    def after_eval(self, event):
        self._count(event)
        event.dials.set("rope_base", event.dials.value("rope_base") * self.nudge)

    def state_dict(self):
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state):
        self.counts = dict(state["counts"])
