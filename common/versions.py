"""libvirt's version numbers (major * 1,000,000 + minor * 1,000 + release) as text."""


def version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
