"""A zoo of the architectures a sparse-training researcher brings, built from torch.nn at toy sizes: ResNet
(BasicBlock and Bottleneck, BatchNorm, 1x1 downsample convolutions), a MobileNetV2-like net (depthwise and
pointwise convolutions, inverted residuals), a ViT (patch-embedding convolution, class token,
nn.TransformerEncoder with norm_first both ways, an attention-pooling nn.MultiheadAttention), a U-Net
(ConvTranspose2d decoder, skip concatenations), an LSTM language model whose decoder is tied to its embedding,
a mixture-of-experts MLP with a router, and a model whose block is called twice and whose two layers share one
weight. Each is sparsified (ERK and uniform, sparsity-aware init) and trained a few steps under every
algorithm, with the checks a correct library must pass on any of them: the layers the docs name are converted
at the distribution's exact counts, weights off the mask stay 0, densities stay constant or on schedule, the
same seed gives the same masks, and compile, state dicts, to_dense and eval mode agree with the dense model
under the masks."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.algorithms import criteria
from sparsekern.nn import SparseModule, sparse_modules

DENSITY = 0.2


# ---------------------------------------------------------------------------------------------- the zoo

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inputs: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inputs != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inputs: int, planes: int, stride: int = 1):
        super().__init__()
        outputs = planes * self.expansion
        self.conv1 = nn.Conv2d(inputs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                            nn.BatchNorm2d(outputs))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(16, 4, stride=2), Bottleneck(16, 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.layer2(self.layer1(x))).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, expand: int):
        super().__init__()
        hidden = inputs * expand
        self.residual = stride == 1 and inputs == outputs
        self.block = nn.Sequential(
            nn.Conv2d(inputs, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
            InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3), InvertedResidual(12, 12, 1, 3),
            nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class ViT(nn.Module):
    def __init__(self, norm_first: bool, classes: int = 5, width: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True,
                                           norm_first=norm_first, activation="gelu")
        # With norm_first torch cannot use nested tensors, and says so unless told not to try.
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(width), enable_nested_tensor=not norm_first)
        self.pool_query = nn.Parameter(torch.randn(1, 1, width))
        self.pool = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.position
        tokens = self.encoder(tokens)
        pooled, _ = self.pool(self.pool_query.expand(len(x), -1, -1), tokens, tokens, need_weights=False)
        return self.head(tokens[:, 0] + pooled[:, 0])


def _double_conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
                         nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU())


class UNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.down1, self.down2 = _double_conv(1, 8), _double_conv(8, 16)
        self.bottom = _double_conv(16, 32)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, 2), _double_conv(32, 16)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, 2), _double_conv(16, 8)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        skip1 = self.down1(x)
        skip2 = self.down2(F.max_pool2d(skip1, 2))
        x = self.bottom(F.max_pool2d(skip2, 2))
        x = self.dec2(torch.cat([self.up2(x), skip2], 1))
        x = self.dec1(torch.cat([self.up1(x), skip1], 1))
        return self.out(x)


class LanguageModel(nn.Module):
    """An LSTM language model whose decoder is tied to its embedding (Press and Wolf; as in the RigL and
    Selfish-RNN papers' character models)."""

    def __init__(self, vocabulary: int = 30, width: int = 16):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.rnn = nn.LSTM(width, width, num_layers=2, batch_first=True, dropout=0.1)
        self.decoder = nn.Linear(width, vocabulary)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        output, _ = self.rnn(self.embedding(tokens))
        return self.decoder(output)


class MixtureOfExperts(nn.Module):
    """Top-1 routing over MLP experts, each output scaled by its router probability (Switch Transformer)."""

    def __init__(self, inputs: int = 12, width: int = 16, experts: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(inputs, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                     for _ in range(experts))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        probabilities = self.router(h).softmax(-1)
        gate, choice = probabilities.max(-1)
        mixed = torch.zeros_like(h)
        for index, expert in enumerate(self.experts):
            chosen = choice == index
            if chosen.any():
                mixed[chosen] = expert(h[chosen]) * gate[chosen, None]
        return self.head(self.norm(h + mixed))


class SharedBlocks(nn.Module):
    """One block called twice (weight sharing across depth, as in ALBERT or a universal transformer) and two
    distinct layers holding one weight."""

    def __init__(self, inputs: int = 12, width: int = 16, classes: int = 5):
        super().__init__()
        self.stem = nn.Linear(inputs, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU())
        self.encode = nn.Linear(width, width)
        self.decode = nn.Linear(width, width)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.block(self.block(self.stem(x)))
        return self.head(self.decode(torch.tanh(self.encode(h))))


def _images(channels: int = 3, size: int = 16, classes: int = 5):
    def data(seed: int, rows: int = 8):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(rows, channels, size, size, generator=g), torch.randint(0, classes, (rows,), generator=g)
    return data


def _segmentation(seed: int, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 1, 16, 16, generator=g), torch.randint(0, 3, (rows, 16, 16), generator=g)


def _tokens(seed: int, rows: int = 4):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30, (rows, 13), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _features(seed: int, rows: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 12, generator=g), torch.randint(0, 5, (rows,), generator=g)


def _cross_entropy(output, target):
    return F.cross_entropy(output.flatten(0, -2) if output.dim() == 3 else output,
                           target.flatten() if output.dim() == 3 else target)


# name: (build, data(seed) -> (input, target))
ZOO = {
    "resnet": (ResNet, _images()),
    "mobilenetv2": (MobileNetV2, _images()),
    "vit-post-norm": (lambda: ViT(norm_first=False), _images()),
    "vit-pre-norm": (lambda: ViT(norm_first=True), _images()),
    "unet": (UNet, _segmentation),
    "lstm-lm": (LanguageModel, _tokens),
    "moe": (MixtureOfExperts, _features),
    "shared": (SharedBlocks, _features),
}
MODELS = list(ZOO)


def build(name: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ZOO[name][0]()


def data(name: str, seed: int):
    return ZOO[name][1](seed)


def expected_layers(model: nn.Module) -> list[str]:
    """What the docs say sparsify converts: every exact Linear, Conv and ConvTranspose (an attention's out_proj
    with its attention), an exact MultiheadAttention's in_proj and out_proj, an exact LSTM's ih_l<k> and hh_l<k>;
    not a layer whose weight an Embedding (which stays dense) also holds. A shared module once."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out_projs = {id(m.out_proj) for m in model.modules() if type(m) is nn.MultiheadAttention}
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.MultiheadAttention:
            names += [f"{name}.in_proj", f"{name}.out_proj"]
        elif type(module) is nn.LSTM:
            names += [f"{name}.{kind}_l{layer}" for layer in range(module.num_layers) for kind in ("ih", "hh")]
        elif (type(module) in (nn.Linear, nn.Conv2d, nn.ConvTranspose2d) and id(module) not in out_projs
              and id(module.weight) not in embedded):
            names.append(name)
    return names


def erk_densities(shapes, density, dense_first_layer: bool = False):
    """ERK from its definition (RigL's get_sparsities_erdos_renyi): d_l = eps * sum(shape) / prod(shape), eps
    such that the non-zeros total density * sum N_l, a layer above 1 dense and eps solved again (the first
    one dense from the start with `dense_first_layer`)."""
    sizes = [math.prod(shape) for shape in shapes]
    raw = [sum(shape) / size for shape, size in zip(shapes, sizes)]
    dense = {0} if dense_first_layer else set()
    while True:
        free = density * sum(sizes) - sum(sizes[i] for i in dense)
        eps = free / sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        over = {i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense |= over


def primaries(model: nn.Module) -> list[tuple[str, SparseModule]]:
    """One (name, module) per weight: tied modules are one layer."""
    seen, layers = set(), []
    for name, module in sparse_modules(model):
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            layers.append((name, module))
    return layers


def masks(model: nn.Module) -> list[torch.Tensor]:
    return [module.mask.clone() for _, module in sparse_modules(model)]


def assert_zero_off_mask(model: nn.Module, where: str) -> None:
    for name, module in sparse_modules(model):
        off = module.weight.detach()[~module.mask]
        assert torch.all(off == 0), f"{where}: {name} holds {int((off != 0).sum())} non-zero weights off its mask"


def assert_ties_hold(model: nn.Module) -> None:
    """Modules holding one weight hold one mask; a shared module is one module (the shared zoo member)."""
    if isinstance(model, SharedBlocks):
        assert isinstance(model.encode, SparseModule) and model.decode.weight is model.encode.weight
        assert torch.equal(model.decode.mask, model.encode.mask)
    if isinstance(model, LanguageModel):
        assert model.decoder.weight is model.embedding.weight


def sparsified(name: str, distribution: str = "erk", seed: int = 1, density: float = DENSITY) -> nn.Module:
    model = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the tied decoder's (test_sparsify_converts_...)
        sparsekern.sparsify(model, density, distribution=distribution, init="sparse",
                            generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(0)   # dropout's: every run of a test draws the same
    return model


def loss_of(model: nn.Module, name: str, seed: int) -> torch.Tensor:
    x, y = data(name, seed)
    return _cross_entropy(model(x), y)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Toy models run fastest on one thread of these two shared cores; the global generator (dropout's) is
    the test's own."""
    with torch.random.fork_rng(devices=[]):
        yield


# ---------------------------------------------------------------------------------------------- sparsify

@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("name", MODELS)
def test_sparsify_converts_the_documented_layers_at_the_distributions_exact_counts(name, distribution):
    model = build(name)
    expected = expected_layers(model)
    before = {id(p): (n, p.detach().clone()) for n, p in model.named_parameters()}
    norms = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.Embedding))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sparsekern.sparsify(model, DENSITY, distribution=distribution, init="sparse",
                                     generator=torch.Generator().manual_seed(1))
    assert result is model
    messages = [str(w.message) for w in caught]
    if name == "lstm-lm":   # the one warning, which says what silences it: excluding the tied decoder
        assert len(messages) == 1 and messages[0].startswith("decoder (Linear) stays dense"), messages
        assert messages[0].endswith("; exclude decoder to silence this warning"), messages
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sparsekern.sparsify(build(name), DENSITY, exclude="decoder", generator=torch.Generator().manual_seed(1))
    else:
        assert messages == []
    assert [n for n, _ in sparse_modules(model)] == expected

    layers = primaries(model)
    shapes = [tuple(m.weight.shape) for _, m in layers]
    sizes = [math.prod(shape) for shape in shapes]
    counts = [int(m.mask.sum()) for _, m in layers]
    formula = erk_densities(shapes, DENSITY) if distribution == "erk" else [DENSITY] * len(shapes)
    for (layer, _), count, size, density in zip(layers, counts, sizes, formula):
        assert abs(count - density * size) <= 0.5, (layer, count, density * size)
    assert abs(sum(counts) - DENSITY * sum(sizes)) <= len(layers) / 2
    assert_zero_off_mask(model, "after sparsify")
    assert_ties_hold(model)
    for module_name in norms:   # norms and embeddings stay what they were, dense
        assert not isinstance(model.get_submodule(module_name), SparseModule)
    # Every other parameter (norms, embeddings, biases of the attentions, class token) as it was.
    sparse = {id(p) for _, m in sparse_modules(model) for p in m.parameters(recurse=False)}
    for parameter in model.parameters():
        if id(parameter) not in sparse:
            parameter_name, value = before[id(parameter)]
            assert torch.equal(parameter, value), parameter_name


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("name", MODELS)
def test_dense_first_layer_keeps_the_first_layer_in_model_order_dense_and_spreads_the_rest(name, distribution):
    """The first sparsified layer (the stem, the patch embedding, the LSTM's first input matrix) dense; ERK spreads
    the rest of the same total over the others, uniform gives each the density (RigL's uniform setting)."""
    density = 0.4   # ERK refuses 0.2 where the first layer alone holds more (the language model's)
    model = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the tied decoder's
        sparsekern.sparsify(model, density, distribution=distribution, dense_first_layer=True,
                            generator=torch.Generator().manual_seed(1))
    layers = primaries(model)
    assert layers[0][0] == expected_layers(build(name))[0] and bool(layers[0][1].mask.all())
    shapes = [tuple(m.weight.shape) for _, m in layers]
    formula = (erk_densities(shapes, density, dense_first_layer=True) if distribution == "erk"
               else [1.0] + [density] * (len(shapes) - 1))
    for (layer, module), expected in zip(layers, formula):
        assert abs(int(module.mask.sum()) - expected * module.weight.numel()) <= 0.5, layer


def fan_in(module: SparseModule) -> torch.Tensor:
    """Active weights into each weight's output unit, from the layer's definition: a row of a linear weight;
    an output channel of a convolution (its group's inputs, every kernel position); a transposed convolution's
    output channel j of group g, laid out along dim 1 and fed by the input channels of group g."""
    mask = module.mask.float()
    if not getattr(module, "transposed", False):
        return mask.flatten(1).sum(1).view(-1, *[1] * (mask.dim() - 1)).expand(mask.shape)
    per_group = mask.unflatten(0, (module.groups, -1)).sum(dim=(1, *range(3, mask.dim() + 1)), keepdim=True)
    return per_group.expand(module.groups, mask.shape[0] // module.groups, *mask.shape[1:]).flatten(0, 1)


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("name", MODELS)
def test_the_sparsity_aware_init_draws_each_weight_at_variance_one_over_its_units_fan_in(name, distribution):
    """Evci et al. 2022: Var(w) = 1 / fan_in over active inputs, so w^2 * fan_in averages 1 (a chi-square of one
    degree of freedom per weight: its mean over n weights has sd sqrt(2 / n)), at low and at high fan-in alike
    (the layer-scaled init, one variance per layer, averages about 1 too, but over units with more inputs
    than its layer's mean it draws too large: up to 1.76 here)."""
    model = sparsified(name, distribution)
    fans = torch.cat([fan_in(m)[m.mask] for _, m in primaries(model)])
    scaled = torch.cat([(m.weight.detach() ** 2 * fan_in(m))[m.mask] for _, m in primaries(model)])
    low = fans <= fans.median()
    for part in (scaled[low], scaled[~low]):
        assert abs(part.mean().item() - 1) < 5 * math.sqrt(2 / len(part)), part.mean()


@pytest.mark.parametrize("name", MODELS)
def test_sparsify_with_one_seed_gives_one_model(name):
    first, second = sparsified(name, seed=3), sparsified(name, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(masks(first), masks(sparsified(name, seed=4))))


# ---------------------------------------------------------------------------------------------- DST

def _dst_runs():
    runs = [("set", dict()), ("rigl", dict()), ("mest", dict())]
    for prune in criteria.PRUNE:
        for scope in ("layer", "global"):
            runs.append((f"dst-{prune}-{scope}", dict(prune=prune, grow="gradient", scope=scope)))
    runs.append(("dst-magnitude-random-global", dict(prune="magnitude", grow="random", scope="global")))
    return runs


DST_RUNS = dict(_dst_runs())


def _dst(name: str, run: str, steps: int = 4) -> tuple[nn.Module, list[list[torch.Tensor]]]:
    """Trains `steps` steps under one DST run (updates at steps 2 and 4), checking after every optimizer step;
    returns the model and its masks after each step."""
    model = sparsified(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    options = dict(total_steps=steps + 1, update_every=2, end_fraction=1.0, seed=5, drop_fraction=0.3)
    if run in ("set", "rigl", "mest"):
        algorithm = {"set": sparsekern.SET, "rigl": sparsekern.RigL, "mest": sparsekern.MEST}[run](
            model, optimizer, **options)
    else:
        algorithm = sparsekern.DST(model, optimizer, **DST_RUNS[run], **options)
    layers = primaries(model)
    counts = [int(m.mask.sum()) for _, m in layers]
    history = []
    updates = 0
    for step in range(steps):
        loss_of(model, name, step).backward()
        updates += algorithm.step()
        optimizer.step()
        optimizer.zero_grad()
        assert_zero_off_mask(model, f"{run}, step {step}")
        now = [int(m.mask.sum()) for _, m in layers]
        if algorithm.scope == "layer":
            assert now == counts, f"{run}, step {step}"
        else:
            assert sum(now) == sum(counts), f"{run}, step {step}"
        history.append(masks(model))
    assert updates == 2
    assert_ties_hold(model)
    return model, history


@pytest.mark.parametrize("run", list(DST_RUNS))
@pytest.mark.parametrize("name", MODELS)
def test_dst_keeps_weights_off_the_mask_at_zero_and_the_density_constant(name, run):
    initial = masks(sparsified(name))
    model, history = _dst(name, run)
    assert any(not torch.equal(a, b) for a, b in zip(initial, history[-1])), "no mask changed"
    _, again = _dst(name, run)
    for step, (first, second) in enumerate(zip(history, again)):
        assert all(torch.equal(a, b) for a, b in zip(first, second)), f"step {step}: the same seed, other masks"


# ---------------------------------------------------------------------------------------------- IMP, SWAMP, OptG

def _train_cycle(model: nn.Module, name: str, algorithm, steps: int, seed: int) -> None:
    for step in range(algorithm.step_in_cycle, steps):
        loss_of(model, name, seed * 100 + step).backward()
        algorithm.optimizer.step()
        algorithm.optimizer.zero_grad()
        algorithm.step()
        assert_zero_off_mask(model, f"cycle {algorithm.cycle}, step {step}")


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


def _imp(name: str, scope: str) -> list[list[torch.Tensor]]:
    model = sparsified(name, density=1.0)   # IMP starts dense
    imp = sparsekern.IMP(model, _sgd, prune_fraction=0.5, rewind_step=1, scope=scope)
    layers = primaries(model)
    history = []
    for cycle in range(3):   # two rounds of pruning
        _train_cycle(model, name, imp, 3, cycle)
        if cycle == 2:
            break
        before = [int(m.mask.sum()) for _, m in layers]
        imp.next_cycle()
        after = [int(m.mask.sum()) for _, m in layers]
        if scope == "global":
            assert sum(after) == sum(before) - math.ceil(0.5 * sum(before))
        else:
            assert after == [n - math.ceil(0.5 * n) for n in before]
        # Rewound: every entry of the state (BatchNorm statistics too) to step 1's, the survivors masked.
        for key, value in model.state_dict().items():
            if key in imp.rewind_state:
                module = model.get_submodule(key.rpartition(".")[0])
                if isinstance(module, SparseModule) and key.endswith(".weight"):
                    value, saved = value, torch.where(module.mask, imp.rewind_state[key], 0)
                else:
                    saved = imp.rewind_state[key]
                assert torch.equal(value, saved), key
        assert_zero_off_mask(model, f"after pruning {cycle + 1}")
        assert_ties_hold(model)
        history.append(masks(model))
    total = sum(m.weight.numel() for _, m in layers)
    assert sum(int(m.mask.sum()) for _, m in layers) <= math.ceil(total / 4)
    return history


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("name", MODELS)
def test_imp_with_rewinding_prunes_on_schedule_and_repeats(name, scope):
    assert all(torch.equal(a, b) for first, second in zip(_imp(name, scope), _imp(name, scope))
               for a, b in zip(first, second))


def _swamp(name: str) -> list[torch.Tensor]:
    model = sparsified(name, density=1.0)
    x, _ = data(name, 99)
    swamp = sparsekern.SWAMP(model, _sgd, particles=2, prune_fraction=0.5, rewind_step=1, swa_start=1,
                             bn_loader=[x], seed=3)
    layers = primaries(model)
    for cycle in range(2):
        while True:
            _train_cycle(model, name, swamp, 3, swamp.data_seed)
            if not swamp.next_particle():
                break
        assert_zero_off_mask(model, f"averaged, cycle {cycle}")
        if cycle == 0:
            before = sum(int(m.mask.sum()) for _, m in layers)
            swamp.next_cycle()
            assert sum(int(m.mask.sum()) for _, m in layers) == before - math.ceil(0.5 * before)
            assert_zero_off_mask(model, "after pruning")
    assert_ties_hold(model)
    return masks(model)


@pytest.mark.parametrize("name", MODELS)
def test_swamp_with_two_particles_prunes_on_schedule_and_repeats(name):
    assert all(torch.equal(a, b) for a, b in zip(_swamp(name), _swamp(name)))


def _optg(name: str) -> tuple[nn.Module, list[torch.Tensor]]:
    model = sparsified(name, density=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epochs, sparsity = 3, 1 - DENSITY
    optg = sparsekern.OptG(model, sparsity=sparsity, epochs=epochs, lr=0.05)
    layers = primaries(model)
    total = sum(m.weight.numel() for _, m in layers)
    for epoch in range(epochs):
        kept = sum(int(m.mask.sum()) for _, m in layers)
        expected = total if epoch == 0 else total - round(optg.sparsity_at(epoch) * total)
        assert kept == expected, f"epoch {epoch}"
        for step in range(2):
            loss_of(model, name, 10 * epoch + step).backward()
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
            assert [int(m.mask.sum()) for _, m in layers] == [int(m.mask.sum()) for _, m in layers]
        optg.next_epoch()
    assert sum(int(m.mask.sum()) for _, m in layers) == total - round(sparsity * total)
    assert_ties_hold(model)
    return model, masks(model)


@pytest.mark.parametrize("name", MODELS)
def test_optg_ends_at_its_target_and_computes_with_the_masked_weights(name):
    model, first = _optg(name)
    assert all(torch.equal(a, b) for a, b in zip(first, _optg(name)[1]))
    # OptG keeps the pruned values: forward must multiply by the masked weights only.
    exported = export_dense(model)
    model.eval(), exported.eval()
    x, _ = data(name, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), exported(x))


# ---------------------------------------------------------------------------------------------- export, eval, state

def export_dense(model: nn.Module) -> nn.Module:
    """A copy of `model` whose sparse layers (attentions and recurrent modules as a whole) are their to_dense()
    plain modules; a module reachable under two names stays one."""
    model = copy.deepcopy(model)
    replaced = {}
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if isinstance(child, (SparseModule, sparsekern.nn.SparseMultiheadAttention, sparsekern.nn.SparseRNNBase)):
                if id(child) not in replaced:
                    replaced[id(child)] = child.to_dense()
                module._modules[child_name] = replaced[id(child)]
    return model


def _trained(name: str, distribution: str = "erk") -> nn.Module:
    """A sparsified model after two RigL updates (masks moved from sparsify's), in train mode."""
    model = sparsified(name, distribution)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = sparsekern.RigL(model, optimizer, total_steps=5, update_every=2, end_fraction=1.0)
    for step in range(4):
        loss_of(model, name, step).backward()
        rigl.step()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
@pytest.mark.parametrize("name", MODELS)
def test_to_dense_and_the_dense_model_under_the_masks_give_the_sparse_models_eval_outputs(name, distribution):
    model = _trained(name, distribution)
    exported = export_dense(model)
    assert not sparse_modules(exported)
    twin = build(name, seed=8)   # the dense architecture, other weights: the exported state replaces them all
    twin.load_state_dict(exported.state_dict())
    x, _ = data(name, 11)
    for module in (model, exported, twin):
        module.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(exported(x), expected)
        torch.testing.assert_close(twin(x), expected, atol=2e-5, rtol=1e-4)   # torch's fused eval kernels


@pytest.mark.parametrize("name", MODELS)
def test_a_state_dict_loads_into_a_freshly_sparsified_model(name):
    model = _trained(name)
    fresh = sparsified(name, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(fresh)))
    assert_ties_hold(fresh)
    x, _ = data(name, 12)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # and trains on from there as the original does
    model.train(), fresh.train()
    for module in (model, fresh):
        torch.manual_seed(0)
        loss_of(module, name, 13).backward()
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), n


@pytest.mark.parametrize("name", ["resnet", "vit-pre-norm"])
def test_a_compiled_sparse_model_trains_as_the_eager_one(name, fresh_compiler):
    model = sparsified(name)
    for module in model.modules():   # dropout draws differ compiled
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, sparsekern.nn.SparseMultiheadAttention):
            module.dropout = 0.0
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")   # forward and backward traced; Inductor takes minutes here
    for module in (compiled, eager):
        loss_of(module, name, 0).backward()
    torch.testing.assert_close(compiled(data(name, 1)[0]), eager(data(name, 1)[0]), atol=1e-5, rtol=1e-4)
    for (n, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)
    for _, module in sparse_modules(model):
        assert torch.all(module.weight.grad[~module.mask] == 0)


# ---------------------------------------------------------------------------------------------- shared and tied

def test_a_block_called_twice_and_tied_layers_stay_sparse_through_training():
    model = _trained("shared")
    assert model.block[0] is dict(model.named_modules(remove_duplicate=False))["block.0"]
    assert isinstance(model.block[0], SparseModule) and model.block[0].density < 1
    assert isinstance(model.decode, SparseModule) and model.decode.density < 1
    assert_ties_hold(model)
    summary = sparsekern.summary(model, print_fn=None)
    layers = primaries(model)
    assert summary["sparse_weights"]["parameters"] == sum(m.weight.numel() for _, m in layers)
    assert summary["sparse_weights"]["nonzeros"] == sum(int(m.mask.sum()) for _, m in layers)


def test_the_tied_decoder_and_its_embedding_stay_dense_and_whole_through_training():
    model = LanguageModel()
    embedding = model.embedding.weight.detach().clone()
    with pytest.warns(UserWarning, match="decoder"):
        sparsekern.sparsify(model, DENSITY, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.embedding.weight, embedding)
    assert type(model.decoder) is nn.Linear and model.decoder.weight is model.embedding.weight
    model = _trained("lstm-lm")
    assert type(model.decoder) is nn.Linear and model.decoder.weight is model.embedding.weight
    assert bool((model.embedding.weight != 0).all())


# ---------------------------------------------------------------------------------------------- practice

def _state_round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("name", MODELS)
def test_a_dst_run_resumed_into_a_freshly_sparsified_model_ends_where_the_uninterrupted_one_does(name):
    def start(seed):
        model = sparsified(name, seed=seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, sparsekern.RigL(model, optimizer, total_steps=7, update_every=2, end_fraction=1.0)

    def train(model, optimizer, rigl, steps):
        for step in steps:
            torch.manual_seed(step)   # dropout's
            loss_of(model, name, step).backward()
            rigl.step()
            optimizer.step()
            optimizer.zero_grad()

    whole = start(1)
    train(*whole, range(6))
    first = start(1)
    train(*first, range(3))
    state = _state_round_trip({"model": first[0].state_dict(), "optimizer": first[1].state_dict(),
                               "algorithm": first[2].state_dict()})
    resumed = start(2)   # other masks and weights: the state replaces them
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["optimizer"])
    resumed[2].load_state_dict(state["algorithm"])
    train(*resumed, range(3, 6))
    for (key, value), (_, expected) in zip(resumed[0].state_dict().items(), whole[0].state_dict().items()):
        assert torch.equal(value, expected), key
    assert_ties_hold(resumed[0])


@pytest.mark.parametrize("name", MODELS)
def test_pruning_a_trained_sparse_model_by_magnitude_keeps_a_subset_and_its_optimizer_off_it(name):
    model = _trained(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_of(model, name, 0).backward()
    optimizer.step()
    optimizer.zero_grad()
    before = masks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the tied decoder's, again
        sparsekern.sparsify(model, DENSITY / 2, mask="magnitude", optimizer=optimizer)
    for mask, (layer, module) in zip(before, sparse_modules(model)):
        assert not (module.mask & ~mask).any(), layer
    loss_of(model, name, 1).backward()
    optimizer.step()
    assert_zero_off_mask(model, "the step after pruning")
    assert_ties_hold(model)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_vit_under_activation_checkpointing_gets_the_masks_of_the_plain_one(reentrant):
    class CheckpointedViT(ViT):
        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.position
            for layer in self.encoder.layers:
                tokens = torch.utils.checkpoint.checkpoint(layer, tokens, use_reentrant=reentrant)
            tokens = self.encoder.norm(tokens)
            pooled, _ = self.pool(self.pool_query.expand(len(x), -1, -1), tokens, tokens, need_weights=False)
            return self.head(tokens[:, 0] + pooled[:, 0])

    plain = sparsified("vit-pre-norm")
    for module in plain.modules():   # checkpointing draws dropout again in backward
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, sparsekern.nn.SparseMultiheadAttention):
            module.dropout = 0.0
    checkpointed = copy.deepcopy(plain)
    checkpointed.__class__ = CheckpointedViT
    for model in (plain, checkpointed):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mest = sparsekern.MEST(model, optimizer, total_steps=5, update_every=2, end_fraction=1.0)
        for step in range(4):
            loss_of(model, "vit-pre-norm", step).backward()
            mest.step()
            optimizer.step()
            optimizer.zero_grad()
            assert_zero_off_mask(model, f"step {step}")
    assert all(torch.equal(a, b) for a, b in zip(masks(plain), masks(checkpointed)))


@pytest.mark.parametrize("prune, grow, scope", [("magnitude", "gradient", "layer"), ("mest", "gradient", "global"),
                                               ("rsensitivity", "random", "layer"), ("snip", "random", "global")])
def test_experts_without_tokens_give_the_same_masks_with_and_without_host_checks(prune, grow, scope):
    """Three tokens for four experts: at least one gets none, and keeps its mask under a criterion that reads
    the gradient, found on the device without host checks; with zero_grad(set_to_none=False) too (plain SGD:
    momentum would move such an expert's weights by its old gradients when its gradient is 0, not None)."""
    def train(host_checks, set_to_none):
        model = sparsified("moe")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        algorithm = sparsekern.DST(model, optimizer, prune=prune, grow=grow, scope=scope, total_steps=7,
                                   update_every=2, end_fraction=1.0, host_checks=host_checks)
        for step in range(6):
            x, y = data("moe", step)
            _cross_entropy(model(x[:3]), y[:3]).backward()
            algorithm.step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
            assert_zero_off_mask(model, f"step {step}")
        return masks(model)

    expected = train(True, True)
    for host_checks, set_to_none in ((False, True), (True, False), (False, False)):
        assert all(torch.equal(a, b) for a, b in zip(train(host_checks, set_to_none), expected))
