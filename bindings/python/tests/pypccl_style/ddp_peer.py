# A data-parallel training peer written against PCCL 1.0's (pypccl's) Python
# API only, in the style of its MNIST end-to-end test: an MLP on MNIST-shaped
# generated data (28x28 inputs, 10 classes from a fixed random teacher),
# Adam, model and optimizer state in a SharedState, gradients averaged with
# all_reduce_async. Peers that join late receive the state at their first
# sync_shared_state. Progress is printed as one JSON object per line.
#
# Environment: PCCL_TEST_MASTER_ADDRESS (ip:port), RANK, EXPECTED_WORLD_SIZE
# (train until this many peers took part...), MAX_STEPS, EXTRA_STEPS (...and
# at least EXTRA_STEPS more steps with all of them, and MAX_STEPS in total).
import json
import os
import zlib
from time import sleep
from typing import List

import torch
import torch.nn as nn
import torch.optim as optim

import pccl
from pccl import Attribute, Communicator, PCCLError, ReduceOp, SharedState, TensorInfo

HOST: str = os.environ["PCCL_TEST_MASTER_ADDRESS"]
RANK: int = int(os.getenv("RANK", "0"))
EXPECTED_WORLD_SIZE: int = int(os.getenv("EXPECTED_WORLD_SIZE", "3"))
MAX_STEPS: int = int(os.getenv("MAX_STEPS", "20"))
EXTRA_STEPS: int = int(os.getenv("EXTRA_STEPS", "8"))

input_size = 28 * 28
hidden_sizes = [64]
num_classes = 10
batch_size = 64
learning_rate = 0.003

torch.set_num_threads(1)
device = torch.device("cpu")


def log(event: str, **kw) -> None:
    kw["event"] = event
    kw["rank"] = RANK
    print(json.dumps(kw), flush=True)


def compute_crc32(tensors: List[torch.Tensor]) -> int:
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


class NeuralNet(nn.Module):
    def __init__(self, input_size: int, hidden_sizes: List[int], num_classes: int):
        super(NeuralNet, self).__init__()
        self.fc1 = nn.Linear(input_size, hidden_sizes[0])
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_sizes[-1], num_classes)

    def forward(self, x):
        x = x.view(-1, input_size)
        return self.fc2(self.relu(self.fc1(x)))


teacher = torch.randn(input_size, num_classes, generator=torch.Generator().manual_seed(1234))


def batch(step: int):
    g = torch.Generator().manual_seed(1000 * RANK + step)
    images = torch.rand(batch_size, 1, 28, 28, generator=g)
    labels = (images.view(batch_size, -1) - 0.5).matmul(teacher).argmax(dim=1)
    return images, labels


def main():
    torch.manual_seed(42)
    model = NeuralNet(input_size, hidden_sizes, num_classes).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=learning_rate)

    communicator: Communicator = Communicator(HOST, 0)
    n_attempts = 5
    for attempt in range(n_attempts):
        try:
            communicator.connect()
            break
        except PCCLError as e:
            print(f"(RANK={RANK}) Failed to connect to the master node: {e}; (Attempt {attempt + 1}/{n_attempts})")
            sleep(1)
    else:
        assert False, f"(RANK={RANK}) Failed to connect to the master node"
    log("connected")

    # A dummy step creates the optimizer state before the shared state refers to it.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()

    shared_state_dict = {}
    for name, param in model.named_parameters():
        shared_state_dict[name] = param
        state = optimizer.state[param]
        shared_state_dict[f"{name}_m1"] = state["exp_avg"]
        shared_state_dict[f"{name}_m2"] = state["exp_avg_sq"]
        shared_state_dict[f"{name}_step"] = state["step"]
    entries = [TensorInfo.from_torch(tensor, name, allow_content_inequality=False)
               for name, tensor in shared_state_dict.items()]
    shared_state: SharedState = SharedState(entries)

    first_sync = None
    reached_at = None
    losses = []
    i = 0
    while True:
        i += 1
        if i > 1 and communicator.are_peers_pending():
            communicator.update_topology()

        world_size = communicator.get_attribute(Attribute.LOCAL_WORLD_SIZE)
        if world_size < 2:
            sleep(0.1)
            continue

        sync_info = communicator.sync_shared_state(shared_state)
        if first_sync is None:
            first_sync = {"revision": shared_state.revision, "rx_bytes": sync_info.rx_bytes}
        if reached_at is None and world_size >= EXPECTED_WORLD_SIZE:
            reached_at = shared_state.revision
        if reached_at is not None and shared_state.revision >= max(MAX_STEPS, reached_at + EXTRA_STEPS):
            break

        images, labels = batch(shared_state.revision)
        outputs = model(images)
        loss = criterion(outputs, labels)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()

        grads = torch.cat([p.grad.view(-1) for p in model.parameters() if p.grad is not None])
        while True:
            handle = communicator.all_reduce_async(grads, grads, op=ReduceOp.AVG)
            is_success, status, info = handle.wait()
            if not is_success:
                print(f"(RANK={RANK}, it={i}) all_reduce_async() failed: {status}; retrying...")
                continue
            break

        offset = 0
        for p in model.parameters():
            numel = p.numel()
            p.grad.data.copy_(grads[offset:offset + numel].view_as(p.grad))
            offset += numel
        optimizer.step()
        shared_state.revision += 1
        losses.append(loss.item())
        log("step", revision=shared_state.revision, loss=loss.item(), world=info.local_world_size,
            world_size=info.world_size)

    log("result", revision=shared_state.revision, digest=compute_crc32(list(shared_state_dict.values())),
        first_sync=first_sync, reached_at=reached_at, steps=len(losses), losses=losses,
        cuda=pccl.cuda.is_available())


if __name__ == "__main__":
    main()
