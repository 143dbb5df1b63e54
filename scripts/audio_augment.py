"""Training augmentation of waveform batches on the device, for train_audio.py: a random window of each clip, speed,
time shift, gain, background noise and mixup (SpecAugment runs in the model's frontend). Every draw comes from the
global RNG, which is seeded per process and saved in checkpoints, so a resumed run draws what an uninterrupted one
does."""

import torch


def augment_waveforms(waves: torch.Tensor, lengths: torch.Tensor, num_samples: int, noise: torch.Tensor, args) -> torch.Tensor:
    if args.no_augment:
        return waves[:, :num_samples]
    waves = time_shift(speed_perturb(random_windows(waves, lengths, num_samples), args.speed), args.time_shift)
    batch, length = waves.shape
    if args.gain_db:
        waves = waves * 10 ** ((torch.rand(batch, 1, device=waves.device) * 2 - 1) * args.gain_db / 20)
    if noise.numel() and args.noise_prob:
        if noise.numel() <= length:
            noise = noise.repeat(length // noise.numel() + 2)
        starts = torch.randint(0, noise.numel() - length, (batch, 1), device=waves.device)
        segments = noise[starts + torch.arange(length, device=waves.device)]
        volume = torch.rand(batch, 1, device=waves.device) * args.noise_volume
        waves = waves + volume * (torch.rand(batch, 1, device=waves.device) < args.noise_prob) * segments
    return waves


def random_windows(waves: torch.Tensor, lengths: torch.Tensor, num_samples: int) -> torch.Tensor:
    """num_samples from a random start within each clip's first lengths[i] samples (the cache pads every clip to at
    least num_samples, so a clip no longer than that keeps its start)."""
    if waves.shape[1] == num_samples:  # no clip of the split is longer: nothing to draw
        return waves
    starts = (torch.rand(len(waves), device=waves.device) * (lengths.to(waves.device) - num_samples + 1)).long()
    return waves.gather(1, starts[:, None] + torch.arange(num_samples, device=waves.device))


def speed_perturb(waves: torch.Tensor, amount: float) -> torch.Tensor:
    """Each clip played at a random speed in [1 - amount, 1 + amount] by linear interpolation: sample t of the output
    is the input at t x speed, so pitch and tempo change together; a faster clip ends early, in silence."""
    if not amount:
        return waves
    batch, length = waves.shape
    speed = 1 + (torch.rand(batch, 1, device=waves.device) * 2 - 1) * amount
    where = torch.arange(length, device=waves.device) * speed
    left = where.floor().long().clamp(max=length - 1)
    frac = where - left
    right = (left + 1).clamp(max=length - 1)
    mixed = waves.gather(1, left) * (1 - frac) + waves.gather(1, right) * frac
    return mixed * (where <= length - 1)


def time_shift(waves: torch.Tensor, fraction: float) -> torch.Tensor:
    """Move each clip by a random whole number of samples up to +-fraction of its length, with silence in the gap:
    an event keeps its shape but not its place, and nothing from the end wraps round to the start."""
    batch, length = waves.shape
    limit = round(fraction * length)
    if not limit:
        return waves
    shifts = torch.randint(-limit, limit + 1, (batch, 1), device=waves.device)
    source = torch.arange(length, device=waves.device) - shifts  # positive shifts delay the clip
    inside = (source >= 0) & (source < length)
    return waves.gather(1, source.clamp(0, length - 1)) * inside


def mixup_loss(model, criterion, waves, targets, alpha: float) -> torch.Tensor:
    """Cross-entropy, or with --mixup the loss of a Beta-weighted blend of each clip with another one."""
    if not alpha or not model.training:
        return criterion(model(waves), targets)
    lam = torch.distributions.Beta(torch.tensor(alpha, device=waves.device), torch.tensor(alpha, device=waves.device)).sample()
    perm = torch.randperm(len(waves), device=waves.device)
    logits = model(lam * waves + (1 - lam) * waves[perm])
    return lam * criterion(logits, targets) + (1 - lam) * criterion(logits, targets[perm])
