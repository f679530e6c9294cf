"""The running provisioner: the reconciler loop and the SSH endpoint of one home folder."""

from __future__ import annotations

import logging
import threading

import paramiko

from tinkops.errors import ConfigError
from tinkops.home import REPO_NAME, Operator, ProvisionerConfig
from tinkops.identities import Principal, Role, key_fingerprint, parse_public_key
from tinkops.observe import Metrics, MetricsServer
from tinkops.prereceive import HookSettings, install_hooks
from tinkops.reconciler import ReconcileLoop, Reconciler
from tinkops.repository import SnapshotReader
from tinkops.sshserver import GitSSHServer
from tinkops_agent.gitrepo import GitRepo

log = logging.getLogger(__name__)


class RepositoryKeyDirectory:
    """Operators from the configuration; workers from the hardware records on the main branch."""

    def __init__(self, repo: GitRepo, branch: str, operators: list[Operator]) -> None:
        self.repo = repo
        self.branch = branch
        self._operators: dict[bytes, Principal] = {}
        for operator in operators:
            key = parse_public_key(operator.key)
            self._operators[key.asbytes()] = Principal(
                Role.OPERATOR, operator.name, key_fingerprint(key)
            )
        self._reader = SnapshotReader(repo)
        self._lock = threading.Lock()
        self._tip: str | None = None
        self._workers: dict[bytes, Principal] = {}

    def lookup(self, key: paramiko.PKey) -> Principal | None:
        blob = key.asbytes()
        if blob in self._operators:
            return self._operators[blob]
        return self._worker_keys().get(blob)

    def _worker_keys(self) -> dict[bytes, Principal]:
        with self._lock:
            tip = self.repo.rev_parse(f"refs/heads/{self.branch}")
            if tip is None or tip == self._tip:
                return self._workers
            snapshot = self._reader.read(tip)
            workers: dict[bytes, Principal] = {}
            for record in snapshot.hardware.values():
                for line in record.agent_keys:
                    try:
                        key = parse_public_key(line)
                    except ValueError as error:
                        log.warning("%s: agent key ignored: %s", record.file, error)
                        continue
                    workers[key.asbytes()] = Principal(
                        Role.WORKER, record.name, key_fingerprint(key), record.worker_ids
                    )
            self._tip, self._workers = tip, workers
            return workers


class Provisioner:
    """The reconciler loop and the SSH endpoint of one provisioner home, running together."""

    def __init__(self, config: ProvisionerConfig, *, metrics_port: int | None = None) -> None:
        self.config = config
        self.repo = GitRepo(config.repository)
        if not (config.repository / "HEAD").exists():
            raise ConfigError(f"no repository at {config.repository}; run 'tinkops init'")
        self.metrics = Metrics(self.repo, config.branch)
        self.metrics_server = (
            MetricsServer(self.metrics, config.listen, metrics_port)
            if metrics_port is not None
            else None
        )
        self.reconciler = Reconciler(
            self.repo,
            config.branch,
            timeout_grace=config.timeout_grace,
            require_signed_events=config.require_signed_events,
        )
        self.loop = ReconcileLoop(
            self.reconciler,
            poll_interval=config.poll_interval,
            on_pass=lambda seconds, result: self.metrics.record_pass(
                seconds, len(result.created) if result else 0, failed=result is None
            ),
            archive_after_days=config.archive_after_days,
        )
        host_key = paramiko.Ed25519Key.from_private_key_file(str(config.host_key_path))
        self.host_key_line = f"{host_key.get_name()} {host_key.get_base64()}"
        self.host_key_fingerprint = key_fingerprint(host_key)
        keys = RepositoryKeyDirectory(self.repo, config.branch, config.operators)
        self.server = GitSSHServer(
            config.repository,
            host_key,
            keys,
            host=config.listen,
            port=config.port,
            repo_name=REPO_NAME,
            on_push=lambda _principal: self.loop.trigger(),
            limits=config.limits,
            hook_settings=HookSettings(
                main_branch=config.branch,
                allow_force_push_main=config.allow_force_push_main,
                require_signed_events=config.require_signed_events,
                audit_log=config.audit_log_path,
            ),
        )

    @property
    def url(self) -> str:
        return f"ssh://tinkops@{self.config.listen}:{self.server.port}/{REPO_NAME}"

    def start(self) -> None:
        install_hooks(self.config.repository)
        try:
            self.server.start()
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {self.config.listen}:{self.config.port} ({error.strerror}); "
                "stop the process using it or choose another port with --port"
            ) from error
        self.loop.start(watch=self.config.repository)
        self.loop.trigger()
        if self.metrics_server is not None:
            self.metrics_server.start()
            log.info(
                "metrics on http://%s:%d/metrics", self.config.listen, self.metrics_server.port
            )
        log.info("provisioner serving %s (host key %s)", self.url, self.host_key_fingerprint)

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.server.stop()
        self.loop.stop()

    def __enter__(self) -> Provisioner:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
