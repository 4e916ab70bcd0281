"""Distillation methods against hand-written formulas on small fixed tensors.

Every expected value is computed here from plain torch arithmetic (softmax, logs, sums
written out), never by running the code under test a second time.
"""
import copy
import math

import pytest
import torch

import kdtune
from kdtune.data.splits import split
from kdtune.distill import INPUTS, METHODS, TEACHER_TARGETS
from kdtune.errors import SpecError
from kdtune.models import Features, count_params, create_model
from kdtune.models.features import classifier_head
from kdtune.models.resolve import build_model
from kdtune.preflight import check_models
from kdtune.space import parse_space


def make(name, student, teacher, num_train=16, **params):
    return METHODS[name](student, teacher, num_train, **params)


def softmax(z):
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def kl_rows(p, q):
    """Batch mean of sum_c p log(p / q), zeros of p contributing nothing."""
    terms = torch.where(p > 0, p * torch.log(p / q), torch.zeros_like(p))
    return terms.sum() / p.shape[0]


def smooth_l1(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


# ---------------------------------------------------------------- KD

def test_kd_matches_explicit_formula():
    g = torch.Generator().manual_seed(0)
    s_logits, t_logits = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g) * 3
    labels = torch.tensor([0, 3, 1, 4])
    T, alpha = 3.0, 0.7
    s = Features(s_logits, torch.zeros(4, 2))
    out = make("kd", s, {"logits": t_logits}, temperature=T, alpha=alpha).losses(
        s, {"logits": t_logits}, labels, torch.arange(4), 0.0)

    ps, pt = softmax(s_logits / T), softmax(t_logits / T)
    kl = sum(float(pt[b, c] * (math.log(pt[b, c]) - math.log(ps[b, c])))
             for b in range(4) for c in range(5)) / 4
    ce = -sum(math.log(softmax(s_logits)[b, labels[b]]) for b in range(4)) / 4
    assert out["kd"].item() == pytest.approx(alpha * T ** 2 * kl, rel=1e-5)
    assert out["ce"].item() == pytest.approx((1 - alpha) * ce, rel=1e-5)


@pytest.mark.parametrize("label_smoothing, ce_weight", [(0.0, 1.0), (0.1, 0.5)])
def test_kd_gradient_is_the_composed_losses(label_smoothing, ce_weight):
    """KD's closed-form gradient equals autograd's through the loss written out op by op."""
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g) * 2
    labels, T, alpha = torch.tensor([0, 6, 2, 2, 5, 1]), 2.5, 0.6
    leaf = s_logits.clone().requires_grad_()
    s = Features(leaf, torch.zeros(6, 2))
    method = make("kd", s, {"logits": t_logits}, ce_weight=ce_weight, label_smoothing=label_smoothing,
                  temperature=T, alpha=alpha)
    out = method.losses(s, {"logits": t_logits}, labels, torch.arange(6), 0.0)
    (3 * out["kd"] - 2 * out["ce"]).backward()  # unequal upstream gradients reach each term

    z = s_logits.clone().requires_grad_()
    log_q = z / T - torch.log(torch.exp(z / T).sum(1, keepdim=True))
    pt = softmax(t_logits / T)
    kd = alpha * T ** 2 * (pt * (torch.log(pt) - log_q)).sum() / 6
    target = torch.full((6, 7), label_smoothing / 7)
    target[torch.arange(6), labels] += 1 - label_smoothing
    ce = -(1 - alpha) * ce_weight * (target * (z - torch.log(torch.exp(z).sum(1, keepdim=True)))).sum() / 6
    (3 * kd - 2 * ce).backward()
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert torch.allclose(leaf.grad, z.grad, atol=1e-6)


def test_kd_keeps_the_dtype_of_bf16_logits():
    """Under bf16 autocast the student's logits are bf16: the loss is computed in fp32 and the
    gradient handed back in bf16."""
    logits = torch.randn(4, 5).to(torch.bfloat16).requires_grad_()
    s = Features(logits, torch.zeros(4, 2))
    out = make("kd", s, {"logits": torch.randn(4, 5)}).losses(s, {"logits": torch.randn(4, 5)},
                                                              torch.tensor([0, 1, 2, 3]), torch.arange(4), 0.0)
    (out["kd"] + out["ce"]).backward()
    assert out["kd"].dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all()


# ---------------------------------------------------------------- RKD

def rkd_out(student_emb, teacher_emb, **params):
    s = Features(torch.zeros(len(student_emb), 3), student_emb)
    t = {"embedding": teacher_emb}
    return make("rkd", s, t, **params).losses(s, t, torch.zeros(len(student_emb), dtype=torch.long),
                                               torch.arange(len(student_emb)), 0.0)


def test_rkd_is_zero_for_a_scaled_copy_and_positive_otherwise():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(6, 5, generator=g)
    same = rkd_out(3 * teacher, teacher)
    assert same["rkd_dist"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["rkd_angle"].item() == pytest.approx(0.0, abs=1e-6)
    other = rkd_out(torch.randn(6, 4, generator=g), teacher)
    assert other["rkd_dist"].item() > 1e-3 and other["rkd_angle"].item() > 1e-3


def test_rkd_d_has_no_angle_term_and_the_same_distance_term():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 5, generator=g)
    full, distance_only = rkd_out(student, teacher), rkd_out(student, teacher, w_angle=0.0)
    assert set(distance_only) == {"ce", "rkd_dist"}
    assert distance_only["rkd_dist"].item() == pytest.approx(full["rkd_dist"].item(), rel=1e-6)


def test_rkd_three_points_by_hand():
    teacher_pts = [(0.0, 0.0), (3.0, 0.0), (0.0, 4.0)]  # a 3-4-5 triangle
    student_pts = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]  # an isosceles right triangle
    out = rkd_out(torch.tensor(student_pts), torch.tensor(teacher_pts), w_dist=25.0, w_angle=50.0, beta=2.0)

    def dist_matrix(pts):
        d = [[math.dist(a, b) for b in pts] for a in pts]
        mean = sum(x for row in d for x in row if x > 0) / 6  # 6 ordered distinct pairs
        return [[x / mean for x in row] for row in d]

    def cosines(pts):
        def unit(i, j):
            v = (pts[j][0] - pts[i][0], pts[j][1] - pts[i][1])
            n = math.hypot(*v)
            return (v[0] / n, v[1] / n) if n > 0 else (0.0, 0.0)
        return [sum(a * b for a, b in zip(unit(i, j), unit(i, k)))
                for i in range(3) for j in range(3) for k in range(3)]

    ds, dt = dist_matrix(student_pts), dist_matrix(teacher_pts)
    dist = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(3) for j in range(3)) / 9
    angle = sum(smooth_l1(a - b) for a, b in zip(cosines(student_pts), cosines(teacher_pts))) / 27
    assert dist > 0 and angle > 0
    assert out["rkd_dist"].item() == pytest.approx(2.0 * 25.0 * dist, rel=1e-5)
    assert out["rkd_angle"].item() == pytest.approx(2.0 * 50.0 * angle, rel=1e-5)


# ---------------------------------------------------------------- CRD

def normalize_rows(x):
    return x / x.pow(2).sum(1, keepdim=True).sqrt()


def hand_nce(bank, v, rows, T, num_train, z=None):
    """Scores exp(<bank row, v>/T) / Z, then the NCE loss; returns (loss, Z)."""
    scores = torch.stack([torch.stack([torch.exp((bank[r] * v[b]).sum() / T) for r in rows[b]])
                          for b in range(len(rows))])
    z = scores.mean() * num_train if z is None else z
    p = scores / z
    m, pn, eps = rows.shape[1] - 1, 1.0 / num_train, 1e-7
    total = 0.0
    for b in range(len(rows)):
        total += math.log(p[b, 0] / (p[b, 0] + m * pn + eps))
        total += sum(math.log(m * pn / (p[b, j] + m * pn + eps)) for j in range(1, m + 1))
    return -total / len(rows), z


def test_crd_nce_value_bank_update_and_fixed_z(monkeypatch, num_train=20):
    torch.manual_seed(0)
    T, mom, beta = 0.07, 0.3, 0.8  # mom != 0.5 so mom and 1 - mom are told apart
    s_emb, t_emb = torch.randn(2, 5), torch.randn(2, 7)
    s, t = Features(torch.zeros(2, 3), s_emb), {"embedding": t_emb}
    crd = make("crd", s, t, num_train=num_train, feat_dim=4, nce_k=3, nce_mom=mom)
    negatives = [torch.tensor([0, 2, 5]), torch.tensor([5, 4, 4])]  # drawn once per batch, shared
    monkeypatch.setattr(torch, "randint", lambda *a, **k: negatives.pop(0))
    idx = torch.tensor([1, 4])
    rows = torch.tensor([[1, 0, 2, 5], [4, 0, 2, 5]])

    bank_s, bank_t = crd.bank_s.clone(), crd.bank_t.clone()
    stdv = 1 / math.sqrt(4 / 3)
    assert bank_s.shape == (num_train, 4) and bank_s.abs().max() <= stdv
    assert crd.z_s.item() < 0 and crd.z_t.item() < 0
    with torch.no_grad():
        v_s = normalize_rows(s_emb @ crd.embed_s.weight.T + crd.embed_s.bias)
        v_t = normalize_rows(t_emb @ crd.embed_t.weight.T + crd.embed_t.bias)
    out = crd.losses(s, t, torch.zeros(2, dtype=torch.long), idx, 0.0)

    # student scored against the teacher bank, teacher against the student bank
    loss_s, z_s = hand_nce(bank_t, v_s, rows, T, num_train)
    loss_t, z_t = hand_nce(bank_s, v_t, rows, T, num_train)
    assert out["crd"].item() == pytest.approx(beta * (loss_s + loss_t), rel=1e-4)
    assert crd.z_s.item() == pytest.approx(z_s.item(), rel=1e-5)
    assert crd.z_t.item() == pytest.approx(z_t.item(), rel=1e-5)

    # momentum update of the batch's rows only, renormalised
    for bank_before, bank_after, v in ((bank_s, crd.bank_s, v_s), (bank_t, crd.bank_t, v_t)):
        expected = bank_before.clone()
        expected[idx] = normalize_rows(bank_before[idx] * mom + v * (1 - mom))
        assert torch.allclose(bank_after, expected, atol=1e-6)

    # a second batch keeps Z from the first one
    z_first = (crd.z_s.clone(), crd.z_t.clone())
    bank_s, bank_t = crd.bank_s.clone(), crd.bank_t.clone()
    s2, t2 = Features(torch.zeros(2, 3), 5 * torch.randn(2, 5)), {"embedding": torch.randn(2, 7)}
    with torch.no_grad():
        v_s = normalize_rows(s2.embedding @ crd.embed_s.weight.T + crd.embed_s.bias)
        v_t = normalize_rows(t2["embedding"] @ crd.embed_t.weight.T + crd.embed_t.bias)
    out = crd.losses(s2, t2, torch.zeros(2, dtype=torch.long), idx, 0.1)
    rows = torch.tensor([[1, 5, 4, 4], [4, 5, 4, 4]])
    assert crd.z_s.item() == z_first[0].item() and crd.z_t.item() == z_first[1].item()
    expected = beta * (hand_nce(bank_t, v_s, rows, T, num_train, z_first[0])[0]
                       + hand_nce(bank_s, v_t, rows, T, num_train, z_first[1])[0])
    assert out["crd"].item() == pytest.approx(expected, rel=1e-4)


def test_crd_nce_caps_negatives_and_is_lower_when_embeddings_align():
    torch.manual_seed(0)
    n, d = 32, 8
    data = torch.randn(n, d)
    s = Features(torch.zeros(n, 3), data)
    crd = make("crd", s, {"embedding": data}, num_train=n, feat_dim=d)
    assert crd.k == n - 1  # 16384 negatives capped at num_train - 1
    with torch.no_grad():  # identity heads: the banks learn the normalised data itself
        for head in (crd.embed_s, crd.embed_t):
            head.weight.copy_(torch.eye(d))
            head.bias.zero_()
    labels = torch.zeros(8, dtype=torch.long)
    for _ in range(4):  # a few aligned epochs fill both banks
        for idx in torch.arange(n).split(8):
            crd.losses(Features(torch.zeros(8, 3), data[idx]), {"embedding": data[idx]}, labels, idx, 0.0)

    def loss(student_rows):
        torch.manual_seed(1)  # the same negatives for both
        idx = torch.arange(8)
        return copy.deepcopy(crd).losses(Features(torch.zeros(8, 3), data[student_rows]),
                                         {"embedding": data[idx]}, labels, idx, 1.0)["crd"].item()

    assert loss(torch.arange(8)) < loss(torch.arange(8).roll(1)) - 1.0


# ---------------------------------------------------------------- DKD

def test_dkd_sums_to_kd_when_beta_is_one_minus_teacher_target_prob():
    g = torch.Generator().manual_seed(2)
    s_logits, t_logits = torch.randn(1, 6, generator=g), 2 * torch.randn(1, 6, generator=g)
    label, T = torch.tensor([2]), 4.0
    pt, ps = softmax(t_logits / T), softmax(s_logits / T)
    s = Features(s_logits, torch.zeros(1, 2))
    t = {"logits": t_logits}
    dkd = make("dkd", s, t, alpha=1.0, beta=1 - pt[0, 2].item(), temperature=T, warmup=1.0)
    out = dkd.losses(s, t, label, torch.zeros(1, dtype=torch.long), 1.5)
    assert (out["tckd"] + out["nckd"]).item() == pytest.approx(T ** 2 * kl_rows(pt, ps).item(), rel=1e-4)


def test_dkd_terms_by_hand_and_warmup():
    g = torch.Generator().manual_seed(3)
    s_logits, t_logits = torch.randn(3, 5, generator=g), 2 * torch.randn(3, 5, generator=g)
    labels, T, alpha, beta = torch.tensor([0, 4, 2]), 2.0, 1.5, 8.0
    s, t = Features(s_logits, torch.zeros(3, 2)), {"logits": t_logits}
    dkd = make("dkd", s, t, alpha=alpha, beta=beta, temperature=T, warmup=2.0)

    ps, pt = softmax(s_logits / T), softmax(t_logits / T)
    rows = torch.arange(3)
    binary = lambda p: torch.stack([p[rows, labels], 1 - p[rows, labels]], 1)
    tckd = T ** 2 * kl_rows(binary(pt), binary(ps))
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[rows, labels] = False
    renorm = lambda p: (p * keep) / (p * keep).sum(1, keepdim=True)
    nckd = T ** 2 * kl_rows(renorm(pt), renorm(ps).clamp_min(1e-30))

    for progress, warm in ((0.0, 0.0), (0.5, 0.25), (2.0, 1.0), (7.0, 1.0)):
        out = dkd.losses(s, t, labels, rows, progress)
        assert out["tckd"].item() == pytest.approx(warm * alpha * tckd.item(), rel=1e-4, abs=1e-7)
        assert out["nckd"].item() == pytest.approx(warm * beta * nckd.item(), rel=1e-4, abs=1e-7)


# ---------------------------------------------------------------- AT

def hand_attention(m):
    a = (m ** 2).sum(1).flatten(1) / m.shape[1]
    return a / a.pow(2).sum(1, keepdim=True).sqrt()


def at_out(s_maps, t_maps, beta=1000.0):
    s = Features(torch.zeros(2, 3), torch.zeros(2, 4), s_maps)
    t = {k: TEACHER_TARGETS[k](Features(None, None, t_maps)) for k in METHODS["at"].teacher_keys}
    return make("at", s, t, beta=beta).losses(s, t, torch.zeros(2, dtype=torch.long), torch.arange(2), 0.0)


def test_at_zero_for_identical_maps_and_matches_hand_formula():
    assert METHODS["at"].needs_conv_student
    g = torch.Generator().manual_seed(4)
    t_maps = [torch.randn(2, 5, 6, 6, generator=g), torch.randn(2, 7, 4, 4, generator=g)]
    assert at_out(t_maps, t_maps)["at"].item() == pytest.approx(0.0, abs=1e-9)

    s_maps = [torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
    value = at_out(s_maps, t_maps, beta=500.0)["at"].item()
    expected = 500.0 / 2 * sum(((hand_attention(a) - hand_attention(b)) ** 2).sum().item() / a[:, 0].numel()
                               for a, b in zip(s_maps, t_maps))
    assert value > 0
    assert value == pytest.approx(expected, rel=1e-5)


def test_at_pools_the_teacher_attention_to_a_smaller_student_stage():
    g = torch.Generator().manual_seed(7)
    t_maps = [torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 7, 6, 6, generator=g)]
    s_maps = [torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 3, generator=g)]
    t_att1 = (t_maps[1] ** 2).mean(1).view(2, 3, 2, 3, 2).mean((2, 4))  # 2x2 blocks averaged by hand
    s_att1 = (s_maps[1] ** 2).mean(1)
    unit = lambda a: a.flatten(1) / a.flatten(1).norm(dim=1, keepdim=True)
    stage1 = ((unit(s_att1) - unit(t_att1)) ** 2).mean().item()
    stage0 = ((hand_attention(s_maps[0]) - hand_attention(t_maps[0])) ** 2).mean().item()
    assert at_out(s_maps, t_maps, beta=2.0)["at"].item() == pytest.approx(stage0 + stage1, rel=1e-5)


# ---------------------------------------------------------------- FitNet

def test_fitnet_linear_regressor_on_embeddings():
    assert METHODS["fitnet"].teacher_keys == ("embedding",)
    g = torch.Generator().manual_seed(6)
    s = Features(torch.zeros(3, 3), torch.randn(3, 5, generator=g))
    t = {"embedding": torch.randn(3, 7, generator=g)}
    fit = make("fitnet", s, t, beta=10.0)
    assert isinstance(fit.regressor, torch.nn.Linear)
    w, b = fit.regressor.weight.detach(), fit.regressor.bias.detach()
    y = s.embedding @ w.T + b
    expected = 10.0 * ((y - t["embedding"]) ** 2).sum().item() / y.numel()
    out = fit.losses(s, t, torch.zeros(3, dtype=torch.long), torch.arange(3), 0.0)
    assert out["hint"].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- SRRL

def frozen_linear(g, n_in, n_out):
    head = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        head.weight.copy_(torch.randn(n_out, n_in, generator=g))
        head.bias.copy_(torch.randn(n_out, generator=g))
    return head.requires_grad_(False)


def srrl_case(seed=8, batch=4):
    g = torch.Generator().manual_seed(seed)
    s = Features(torch.randn(batch, 6, generator=g), torch.randn(batch, 3, generator=g, requires_grad=True))
    t = {"logits": torch.randn(batch, 6, generator=g), "embedding": torch.rand(batch, 5, generator=g)}
    head = frozen_linear(g, 5, 6)
    srrl = make("srrl", s, t, teacher_head=head, alpha=2.0, beta=3.0)
    with torch.no_grad():  # an affine batch norm that is not the identity
        srrl.norm.weight.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0, 0.7]))
        srrl.norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5]))
    return s, t, head, srrl


def test_srrl_terms_by_hand():
    s, t, head, srrl = srrl_case()
    labels = torch.tensor([0, 5, 2, 1])
    out = srrl.losses(s, t, labels, torch.arange(4), 0.0)

    with torch.no_grad():  # connector: x W^T, normalised by the batch mean and biased variance, affine, ReLU
        h = s.embedding @ srrl.project.weight.T
        mean = h.sum(0) / 4
        var = ((h - mean) ** 2).sum(0) / 4
        r = ((h - mean) / torch.sqrt(var + 1e-5) * srrl.norm.weight + srrl.norm.bias).clamp_min(0)
        feature = ((r - t["embedding"]) ** 2).sum() / r.numel()
        z = r @ head.weight.T + head.bias  # the teacher's classifier on the connected student embedding
        sr = ((z - t["logits"]) ** 2).sum() / z.numel()
    ce = -sum(math.log(softmax(s.logits)[b, labels[b]]) for b in range(4)) / 4
    assert feature > 0 and sr > 0
    assert out["srrl_feature"].item() == pytest.approx(2.0 * feature.item(), rel=1e-5)
    assert out["srrl_sr"].item() == pytest.approx(3.0 * sr.item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_srrl_trains_the_connector_through_the_frozen_head_it_does_not_own():
    s, t, head, srrl = srrl_case()
    weights = head.weight.clone()
    assert count_params(srrl) == 3 * 5 + 2 * 5  # the connector's Linear (no bias) and batch norm only
    assert not any(k.startswith("head") for k in srrl.state_dict())
    srrl.losses(s, t, torch.zeros(4, dtype=torch.long), torch.arange(4), 0.0)["srrl_sr"].backward()
    assert srrl.project.weight.grad.abs().sum() > 0 and s.embedding.grad.abs().sum() > 0
    assert head.weight.grad is None and torch.equal(head.weight, weights)
    with pytest.raises(ValueError, match="classifier head"):
        make("srrl", s, t)


def test_srrl_batch_of_one_uses_the_running_statistics():
    s, t, head, srrl = srrl_case(batch=1)
    with torch.no_grad():
        srrl.norm.running_mean.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0, 1.0]))
        srrl.norm.running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0, 0.25]))
        expected = srrl.eval().connect(s.embedding)
        assert torch.equal(srrl.train().connect(s.embedding), expected)
    assert torch.isfinite(srrl.losses(s, t, torch.zeros(1, dtype=torch.long), torch.arange(1), 0.0)["srrl_sr"])


@pytest.mark.parametrize("arch, head_of", [("gapnet_dense", lambda m: m.fc), ("mnist_cnn", lambda m: m.fc2),
                                           ("mlp", lambda m: m.fc3)])
def test_classifier_head_of_built_ins_is_a_frozen_copy(arch, head_of):
    torch.manual_seed(0)
    model = create_model(arch, (1, 28, 28), 10).eval()
    features = model(torch.randn(2, 1, 28, 28))
    head = classifier_head(model, features)
    assert head is not head_of(model) and torch.equal(head.weight, head_of(model).weight)
    assert not any(p.requires_grad for p in head.parameters()) and not head.training


def srrl_spec(embedding):
    return kdtune.load_spec({"name": "h", "data": {"dataset": "python:data", "val_size": 8},
                             "teacher": {"arch": "torchvision:resnet18", "features": {"embedding": embedding}},
                             "student": {"arch": "gapnet", "width": 4}, "search": {"space": {"loss": {"srrl": {}}}}})


@pytest.fixture(scope="module")
def images_64():
    g = torch.Generator().manual_seed(0)
    return split(torch.randn(24, 3, 64, 64, generator=g), torch.arange(24) % 10,
                 torch.randn(4, 3, 64, 64, generator=g), torch.arange(4), 8, 0)


def test_preflight_finds_a_torchvision_teachers_fc_at_its_embedding_node(images_64):
    spec = srrl_spec("flatten")
    teacher = build_model(spec.teacher, images_64.in_shape, 10, "teacher").eval()
    head = check_models(spec, parse_space(spec), images_64, teacher)
    assert torch.equal(head.weight, teacher.original.fc.weight)


def test_preflight_without_a_head_for_the_embedding_is_a_spec_error(images_64):
    """layer4 on 64x64 images is 512 x 2 x 2: no Linear of resnet18 maps its 2048 values to logits."""
    spec = srrl_spec("layer4")
    teacher = build_model(spec.teacher, images_64.in_shape, 10, "teacher").eval()
    with pytest.raises(SpecError) as info:
        check_models(spec, parse_space(spec), images_64, teacher)
    assert info.value.path == "search.space.loss.srrl"
    assert "needs the teacher's classifier" in info.value.message and "2048 features" in info.value.message


# ---------------------------------------------------------------- every method: gradients

CASES = [(name, arch) for name in sorted(METHODS) for arch in ("mlp", "cnn")
         if not (arch == "mlp" and METHODS[name].needs_conv_student)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create_model("mnist_cnn", (1, 28, 28), 10).eval()


@pytest.mark.parametrize("name,arch", CASES)
def test_gradients_reach_student_and_heads_not_teacher(teacher, name, arch):
    torch.manual_seed(0)
    student = create_model(arch, (1, 28, 28), 10, width=8)
    x, labels, num_train = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), 64
    with torch.no_grad():
        t_features = teacher(x)
        t = {k: TEACHER_TARGETS[k](t_features) for k in METHODS[name].teacher_keys}
        example = student(x[:4])
    head = classifier_head(teacher, t_features)
    method = METHODS[name](example, {k: v[:4] for k, v in t.items()}, num_train, teacher_head=head,
                           student_model=student)
    if METHODS[name].needs_inputs:  # dml runs its peers on the batch, as the trial gives it
        t[INPUTS] = x

    terms = method.losses(student(x), t, labels, torch.randperm(num_train)[:8], 5.0)
    assert "ce" in terms and all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    for pname, p in list(student.named_parameters()) + list(method.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}/{arch}: no gradient for {pname}"
    assert all(p.grad is None for p in [*teacher.parameters(), *head.parameters()])


# ---------------------------------------------------------------- parameters

def test_param_validation():
    alpha = METHODS["kd"].params["alpha"]
    assert alpha.check(1.5) is not None and alpha.check(0.5) is None
    assert METHODS["crd"].params["feat_dim"].check(12.5) is not None
    for cls in METHODS.values():
        for pname, p in cls.params.items():
            assert p.check(p.default) is None, f"{cls.name}.{pname} default out of range"
    s = Features(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown"):
        make("kd", s, {"logits": torch.zeros(2, 3)}, bogus=1.0)
