"""Command line: ``main(argv) -> int``; errors become messages and exit codes here and only here.

Each command imports what it needs when it runs: ``drain`` (every exec preStop hook) and
``check`` load neither asyncio nor the data path (tests/test_imports.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drainproxy import __version__
from drainproxy.config.schema import Config, ConfigWarning, read_config
from drainproxy.control.logs import setup_logging
from drainproxy.errors import ConfigError, DrainproxyError

if TYPE_CHECKING:
    from drainproxy.kube.inject import InjectOptions

log = logging.getLogger("drainproxy")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drainproxy", description="Graceful-shutdown reverse-proxy sidecar."
    )
    parser.add_argument("--version", action="version", version=f"drainproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    check = commands.add_parser(
        "check", help="validate a config, and with --manifest the pod specs that run it"
    )
    check.add_argument(
        "--config",
        help="YAML config file (default: with --manifest, the config each pod's ConfigMap holds)",
    )
    check.add_argument(
        "--manifest",
        action="append",
        default=[],
        metavar="PATH",
        help="Kubernetes YAML or JSON to lint together with the config: a file, a directory "
        "(its *.yaml, *.yml, *.json) or - for stdin (repeatable)",
    )
    check.add_argument("--format", choices=("text", "json"), default="text")
    drain = commands.add_parser(
        "drain", help="start the drain of the running drainproxy (for an exec preStop hook)"
    )
    drain.add_argument("--config", required=True, help="the running drainproxy's config file")
    drain.add_argument("--wait", action="store_true", help="return only once the drain is over")
    wrap = commands.add_parser(
        "wrap", help="start the app as a child (the container's PID 1) and proxy to it"
    )
    wrap.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    wrap.add_argument("app_command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    _add_demo_command(commands)
    _add_inject_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return demo(args)
    if args.command == "check":
        if args.config is None and not args.manifest:
            _parser().error("check needs --config, --manifest or both")
        return check(args.config, args.manifest, args.format)
    if args.command == "inject":
        return inject(args.paths or ["-"], _inject_options(args))
    if args.command == "webhook":
        return webhook(args, _inject_options(args))
    try:
        report = read_config(args.config)
        config = report.checked()
    except ConfigError as exc:
        for error in exc.errors:
            print(f"drainproxy: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "drain":
        return drain(config, args.wait)
    if args.command == "wrap":
        return wrap(config, args.app_command, report.warnings)
    return serve(config, report.warnings)


def check(config_path: str | None, manifests: list[str], output: str) -> int:
    """Lint the config and the manifests, reporting everything in one run: exit 2 if the config
    or a manifest does not load, else 1 on error findings, else 0."""
    from drainproxy.config.schema import read_config, read_config_text
    from drainproxy.kube.k8scheck import (
        RULES,
        Finding,
        PodConfig,
        check_manifests,
        config_findings,
        pod_configs,
        workload_docs,
    )
    from drainproxy.kube.manifests import ManifestDoc, ManifestError, load_manifests

    shown_config = config_path or "the pods' config"
    try:
        docs = load_manifests(manifests)
    except ManifestError as exc:
        problem = f"manifest error: {exc}"
        if output == "json":
            print(json.dumps({"config": shown_config, "error": problem, "findings": []}))
        else:
            print(f"drainproxy: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    # What to check against what: the config given, or each workload's own.
    units: list[tuple[str, PodConfig | None, list[ManifestDoc]]]
    if config_path is not None:
        units = [(config_path, None, docs)]
    else:
        units = [
            (unit.source or unit.workload.where, unit, workload_docs(docs, unit.workload))
            for unit in pod_configs(docs)
        ]
        shown_config = ", ".join(source for source, _, _ in units)
        if not units:
            print(
                "drainproxy: check: no container in the manifests runs drainproxy, so there is "
                "no config to read: pass --config",
                file=sys.stderr,
            )
            return EXIT_CONFIG
    findings: list[Finding] = []
    unloadable = False
    for source, unit, unit_docs in units:
        if unit is not None and unit.problem is not None:
            findings.append(unit.problem)
            continue
        try:
            if unit is None:
                report = read_config(config_path)
            elif unit.text is None:
                report = read_config(None)
            else:
                report = read_config_text(unit.text, source)
        except ConfigError as exc:  # unreadable, not YAML, empty: nothing to go on
            findings.append(Finding(RULES["DP001"], source, str(exc), "correct the file as said"))
            unloadable = True
            continue
        findings += config_findings(report, source)
        unloadable |= bool(report.errors)
        if manifests:
            findings += check_manifests(report.config, unit_docs, source)
    errors = sum(finding.is_error for finding in findings)
    if output == "json":
        report_json = {
            "config": shown_config,
            "manifests": manifests,
            "errors": errors,
            "warnings": len(findings) - errors,
            "findings": [finding.as_dict() for finding in findings],
        }
        print(json.dumps(report_json, indent=2))
    else:
        for finding in findings:
            print(finding.line())
        checked = f" with {', '.join(manifests)}" if manifests else ""
        verdict = f"{errors} error(s), {len(findings) - errors} warning(s)" if findings else "ok"
        print(f"{shown_config}{checked}: {verdict}")
    if unloadable:
        return EXIT_CONFIG
    return 1 if errors else 0


def drain(config: Config, wait: bool) -> int:
    from drainproxy.control.drainctl import request_drain

    try:
        print(request_drain(config, wait))
    except DrainproxyError as exc:
        print(f"drainproxy: drain: {exc}", file=sys.stderr)
        return 1
    return 0


def serve(config: Config, warnings: Sequence[ConfigWarning] = ()) -> int:
    return _run_logged(config, lambda loop_name: _serve(config, warnings, loop_name))


def wrap(config: Config, command: list[str], warnings: Sequence[ConfigWarning] = ()) -> int:
    from drainproxy.config.schema import check_wrapper_config

    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        print("drainproxy: wrap: the app's command is missing (wrap -- CMD ARGS)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        check_wrapper_config(config)
    except ConfigError as exc:
        print(f"drainproxy: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return _run_logged(config, lambda loop_name: _wrap(config, command, warnings, loop_name))


def _log_config_warnings(warnings: Sequence[ConfigWarning]) -> None:
    for warning in warnings:
        log.warning(
            "config: %s; fix: %s",
            warning.message,
            warning.fix,
            extra={"event": "config_warning", "field": warning.field},
        )


def _run_logged(config: Config, run: Callable[[str], Coroutine[Any, Any, int]]) -> int:
    """Logging as configured, uvloop if there is one, then ``run(loop_name)`` to its exit
    status; what stops it from starting is logged and is exit status 1."""
    import asyncio

    setup_logging(config.log.format, config.log.level)
    loop_name = _install_uvloop()
    try:
        return asyncio.run(run(loop_name))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except DrainproxyError as exc:
        log.error("%s", exc)
        return 1


async def _serve(config: Config, warnings: Sequence[ConfigWarning], loop_name: str) -> int:
    from drainproxy.control.server import Server

    server = Server(config, loop_name)
    _log_config_warnings(warnings)  # with the server bound, so each line carries its phase
    return await server.run()


async def _wrap(
    config: Config, command: list[str], warnings: Sequence[ConfigWarning], loop_name: str
) -> int:
    """An app command that cannot be started ends drainproxy with the shell's status for that
    (127 not found, 126 not executable)."""
    from drainproxy.control.wrapper import ChildStartError, run_wrapped

    _log_config_warnings(warnings)
    try:
        return await run_wrapped(config, command, loop_name)
    except ChildStartError as exc:
        log.error("%s", exc)
        return exc.exit_code


def _install_uvloop() -> str:
    import asyncio

    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not importable: using the default asyncio loop (slower)")
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# --- drainproxy inject and webhook -----------------------------------------------------------


def _add_inject_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inject = commands.add_parser(
        "inject",
        help="add the drainproxy sidecar to the workloads of Kubernetes manifests",
        description="Prints the manifests with drainproxy added to every Pod, Deployment, "
        "StatefulSet, DaemonSet and ReplicaSet (not Jobs or CronJobs), its config in a "
        "ConfigMap, and the Services pointed at it. drainproxy.io/ annotations on a workload "
        "override the options (see docs/kubernetes.md).",
    )
    inject.add_argument(
        "paths", nargs="*", metavar="PATH", help="YAML or JSON file, directory, or - (default)"
    )
    webhook = commands.add_parser(
        "webhook",
        help="a mutating admission webhook that injects drainproxy into new pods",
        description="Answers POST /mutate (admission.k8s.io/v1 AdmissionReview) with a "
        "JSONPatch that makes of the Pod what drainproxy inject makes of it.",
    )
    webhook.add_argument("--listen", required=True, metavar="HOST:PORT")
    webhook.add_argument("--tls-cert", required=True, metavar="FILE")
    webhook.add_argument("--tls-key", required=True, metavar="FILE")
    webhook.add_argument(
        "--shutdown-delay",
        default="5s",
        metavar="DURATION",
        help="after SIGTERM, how long /healthz fails while reviews are still answered, so the "
        "webhook's endpoint is gone before it stops listening (default 5s)",
    )
    for command in (inject, webhook):
        command.add_argument(
            "--image",
            help="drainproxy's image (default registry.example.com/drainproxy:VERSION); a "
            "workload's drainproxy.io/image annotation overrides it",
        )
        command.add_argument(
            "--style",
            choices=("classic", "native"),
            default="classic",
            help="classic second container (the default) or native sidecar (Kubernetes 1.29+)",
        )
        command.add_argument(
            "--prestop",
            choices=("http", "exec"),
            default="http",
            help="the app's preStop: an httpGet with the admin token (any image), or a shell "
            "hook over loopback with curl/wget/bash (no token)",
        )


def _inject_options(args: argparse.Namespace) -> InjectOptions:
    """``DRAINPROXY_TOKEN_KEY`` in the environment makes inject's admin tokens the same on every
    run (keyed per workload) instead of random."""
    from drainproxy.kube.inject import InjectOptions, keyed_tokens

    options = InjectOptions(style=args.style, hook=args.prestop)
    if args.image:
        options = replace(options, image=args.image)
    key = os.environ.get("DRAINPROXY_TOKEN_KEY")
    if args.command == "inject" and key:
        options = replace(options, new_token=keyed_tokens(key))
    return options


def inject(paths: list[str], options: InjectOptions) -> int:
    """Print the injected manifests; on any error one line on stderr, nothing on stdout, exit 2
    (the output is often piped into kubectl apply)."""
    from drainproxy.kube.inject import InjectError, inject_documents, read_sources, render

    if paths == ["-"] and sys.stdin.isatty():
        print("drainproxy inject: give a PATH, or pipe manifests into -", file=sys.stderr)
        return EXIT_CONFIG
    try:
        source = read_sources(paths)
        warnings = inject_documents(source.documents, options)
        text = render(source)
    except InjectError as exc:
        print(f"drainproxy inject: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in warnings:
        print(f"drainproxy inject: warning: {warning}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


def webhook(args: argparse.Namespace, options: InjectOptions) -> int:
    import asyncio

    from drainproxy.config.schema import parse_duration

    try:
        from drainproxy.kube.webhook import run_webhook
    except ModuleNotFoundError as exc:
        if exc.name != "aiohttp":
            raise
        print(
            "drainproxy webhook: needs aiohttp: pip install 'drainproxy[webhook]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    setup_logging("text", "info")
    try:
        delay = parse_duration("--shutdown-delay", args.shutdown_delay)
        asyncio.run(run_webhook(args.listen, args.tls_cert, args.tls_key, options, delay))
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        print(f"drainproxy webhook: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"drainproxy webhook: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


# --- drainproxy demo ----------------------------------------------------------------------------


def _number(low: float, high: float) -> Callable[[str], float]:
    def read(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} must be from {low:g} to {high:g}")
        return value

    return read


def _add_demo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="delete a replica under load without and with drainproxy, and compare",
        description="Two replicas of a legacy app behind a health-checking load balancer, "
        "steady load from a client that never retries; one replica is deleted the way the "
        "kubelet does it, first without drainproxy, then with it. Under a minute.",
    )
    demo.add_argument(
        "--rate",
        type=_number(1, 1000),
        default=150.0,
        metavar="N",
        help="requests per second (default 150)",
    )
    demo.add_argument(
        "--propagation",
        type=_number(0, 15),
        default=5.0,
        metavar="SECONDS",
        help="drain.propagation: the longest drainproxy keeps serving, not ready, while the "
        "balancer notices (default 5; the balancer needs about 0.5)",
    )
    demo.add_argument(
        "--propagation-mode",
        choices=("evidence", "fixed"),
        default="evidence",
        help="drain.propagation_mode: evidence (default) leaves once the balancer marked the "
        "replica down and traffic stopped; fixed waits all of --propagation",
    )
    demo.add_argument(
        "--slow-share",
        type=_number(0, 1),
        default=0.1,
        metavar="FRACTION",
        help="share of requests that take 1.5s (default 0.1)",
    )
    demo.add_argument(
        "--balancer",
        choices=("auto", "haproxy", "builtin"),
        default="auto",
        help="auto: HAProxy when installed, else the built-in one",
    )
    demo.add_argument(
        "--svg",
        type=Path,
        default=Path("drainproxy-demo.svg"),
        metavar="FILE",
        help="where to draw the timeline (default ./drainproxy-demo.svg)",
    )
    demo.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers as JSON")
    demo.add_argument("--short", action="store_true", help="shorter slow requests and tail")


def demo(args: argparse.Namespace) -> int:
    import asyncio

    try:
        from drainproxy.sim.demo import DemoOptions, run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "aiohttp":
            raise
        print(
            "drainproxy demo: needs aiohttp (its app and load client): "
            "pip install 'drainproxy[demo]'",
            file=sys.stderr,
        )
        return EXIT_CONFIG

    options = DemoOptions(
        rate=args.rate,
        propagation=args.propagation,
        propagation_mode=args.propagation_mode,
        slow_share=args.slow_share,
        balancer=args.balancer,
        svg_path=args.svg,
        json_path=args.json,
        short=args.short,
    )
    try:
        asyncio.run(run_demo(options, sys.stdout))
    except KeyboardInterrupt:
        print("drainproxy demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    except (DrainproxyError, OSError) as exc:
        print(f"drainproxy demo: {exc}", file=sys.stderr)
        return 1
    return 0
