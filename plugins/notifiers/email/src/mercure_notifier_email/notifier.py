"""The ``email`` notifier: one message per recipient of a rule's ``notification_email``.

As mercure does, each address gets its own message (``To`` is that address alone), with the
subject ``[Mercure] Rule <name>: <EVENT>`` and the rendered ``notification_email_body`` as
``text/plain`` or ``text/html``; all recipients of a notification share one SMTP session.

Outcomes, for the outbox:

* the server cannot be reached, drops the connection, or answers 4xx: retry
  (:class:`NotificationError`); recipients that already have the message are not sent it
  again (:mod:`mercure_notifier_email.memory`);
* login refused, STARTTLS or AUTH not offered, the sender refused with 5xx: give up
  (:class:`PermanentNotificationError`), since it fails the same way until the settings change;
* a recipient refused with 5xx: reported by address; the notification is delivered to the
  others, and given up only if every recipient was refused.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

from mercure.logs import get_logger
from mercure.notifiers import (
    Notification,
    NotificationError,
    Notifier,
    PermanentNotificationError,
)
from mercure.tls_trust import client_context

from mercure_notifier_email.memory import RecipientMemory, RecipientState
from mercure_notifier_email.settings import EmailSettings

log = get_logger("mercure.notifier.email")


def build_message(
    notification: Notification, recipient: str, from_address: str, index: int = 0
) -> EmailMessage:
    """The message for one recipient; ``ValueError`` if the address cannot be a header."""
    msg = EmailMessage()
    msg["Subject"] = notification.email_subject
    msg["From"] = from_address
    msg["To"] = recipient
    msg["Date"] = formatdate(localtime=True)
    domain = from_address.rpartition("@")[2].strip(" >") or "mercure"
    # Stable across retries, so that a mail client can drop a repeated delivery.
    msg["Message-ID"] = f"<{notification.id}.{index}@{domain}>"
    msg["X-Mercure-Event"] = notification.event_name
    msg["X-Mercure-Task-Id"] = notification.task_id
    subtype = "html" if notification.email_type == "html" else "plain"
    msg.set_content(notification.email_body, subtype=subtype)
    return msg


def _answer(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {' '.join(text.split())}".strip()


class EmailNotifier(Notifier[EmailSettings]):
    """Sends the e-mail part of a notification; see the module docstring for the outcomes."""

    _memory: RecipientMemory | None = None

    def start(self) -> None:
        self._context: ssl.SSLContext | None = None
        if self.settings.starttls or self.settings.implicit_tls:
            self._context = client_context(self.settings.ca_bundle)
        folder: Path | None
        try:
            folder = self.context.state_dir()
        except RuntimeError:
            folder = None  # no spool here: recipients are remembered in memory only
        self._memory = RecipientMemory(folder)
        self._memory.prune()

    def wants(self, notification: Notification) -> bool:
        return bool(notification.email_to)

    def problem(self, notification: Notification) -> str | None:
        return notification.email_problem

    @property
    def server(self) -> str:
        return f"SMTP server {self.settings.smtp_host}:{self.settings.port}"

    def send(self, notification: Notification) -> str:
        if not notification.email_to:
            raise PermanentNotificationError("the notification has no e-mail recipients")
        if self._memory is None:
            self.start()
        assert self._memory is not None
        state = self._memory.load(notification.id)
        recipients = list(dict.fromkeys(notification.email_to))
        todo = [r for r in recipients if not state.settled(r)]
        temporary: dict[str, str] = {}
        if todo:
            try:
                temporary = self._deliver(notification, recipients, todo, state)
            except PermanentNotificationError:
                self._memory.forget(notification.id)
                raise
            except BaseException:
                self._memory.save(notification.id, state)  # a retry sends to the rest only
                raise
        accepted = [r for r in recipients if r in state.accepted]
        refused = "; ".join(f"{r} ({state.refused[r]})" for r in recipients if r in state.refused)
        if temporary:
            later = "; ".join(f"{r} ({why})" for r, why in temporary.items())
            have = f"; {', '.join(accepted)} already have it" if accepted else ""
            self._memory.save(notification.id, state)
            raise NotificationError(f"{self.server} refused for now: {later}{have}")
        self._memory.forget(notification.id)
        if not accepted:
            raise PermanentNotificationError(f"{self.server} refused every recipient: {refused}")
        receipt = f"{len(accepted)} of {len(recipients)} recipients accepted"
        if refused:
            log.warning(
                "e-mail recipients refused",
                task_id=notification.task_id,
                rule=notification.rule_name,
                refused=refused,
            )
            return f"{receipt}; refused: {refused}"
        return receipt

    def _deliver(
        self,
        notification: Notification,
        recipients: list[str],
        todo: list[str],
        state: RecipientState,
    ) -> dict[str, str]:
        """Send to each of ``todo`` in one session; record outcomes in ``state`` as they come.

        Returns the temporarily refused recipients with the server's answer.
        """
        temporary: dict[str, str] = {}
        smtp = self._session()
        try:
            for index, recipient in enumerate(recipients):
                if recipient not in todo:
                    continue
                try:
                    msg = build_message(notification, recipient, self.settings.from_address, index)
                except (ValueError, TypeError) as exc:
                    state.refused[recipient] = f"not a usable address: {exc}"
                    continue
                refused: dict[str, tuple[int, bytes | str]]
                try:
                    refused = smtp.send_message(  # type: ignore[assignment]
                        msg, from_addr=self.settings.envelope_from, to_addrs=[recipient]
                    )
                except smtplib.SMTPRecipientsRefused as exc:
                    refused = exc.recipients  # type: ignore[assignment]
                except smtplib.SMTPSenderRefused as exc:
                    why = f"{self.server} refused the sender {self.settings.envelope_from}: "
                    why += _answer(exc.smtp_code, exc.smtp_error)
                    if exc.smtp_code >= 500:
                        raise PermanentNotificationError(why) from None
                    raise NotificationError(why) from None
                except smtplib.SMTPDataError as exc:
                    refused = {recipient: (exc.smtp_code, exc.smtp_error)}
                except smtplib.SMTPNotSupportedError as exc:
                    state.refused[recipient] = f"cannot be sent to: {exc}"
                    continue
                except smtplib.SMTPResponseException as exc:
                    raise NotificationError(
                        f"{self.server} failed while sending to {recipient}: "
                        f"{_answer(exc.smtp_code, exc.smtp_error)}"
                    ) from None
                except (smtplib.SMTPException, OSError) as exc:
                    done = len(state.accepted)
                    raise NotificationError(
                        f"{self.server} dropped the connection while sending to {recipient} "
                        f"({exc or exc.__class__.__name__}); {done} recipient(s) have it"
                    ) from None
                if recipient in refused:
                    code, text = refused[recipient]
                    answer = _answer(code, text)
                    if code >= 500:
                        state.refused[recipient] = answer
                    else:
                        temporary[recipient] = answer
                else:
                    state.accepted.append(recipient)
        finally:
            _quietly_close(smtp)  # a failing QUIT changes nothing about what was sent
        return temporary

    def _session(self) -> smtplib.SMTP:
        """A connected, secured and logged-in session; the caller closes it."""
        s = self.settings
        try:
            if s.implicit_tls:
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    s.smtp_host, s.port, timeout=s.timeout, context=self._context
                )
            else:
                smtp = smtplib.SMTP(s.smtp_host, s.port, timeout=s.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise NotificationError(f"{self.server}: {_tls_hint(exc)}") from None
        except smtplib.SMTPConnectError as exc:
            raise NotificationError(
                f"{self.server} refused the session: {_answer(exc.smtp_code, exc.smtp_error)}"
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise NotificationError(
                f"cannot reach {self.server}: {exc or exc.__class__.__name__}"
            ) from None
        try:
            if s.starttls:
                self._starttls(smtp)
            if s.username:
                self._login(smtp)
        except BaseException:
            _quietly_close(smtp)
            raise
        return smtp

    def _starttls(self, smtp: smtplib.SMTP) -> None:
        try:
            smtp.ehlo()
            smtp.starttls(context=self._context)
            smtp.ehlo()
        except smtplib.SMTPNotSupportedError:
            raise PermanentNotificationError(
                f"{self.server} does not offer STARTTLS; set starttls to false, or use "
                "implicit_tls with the server's SMTPS port"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise NotificationError(f"{self.server}: {_tls_hint(exc)}") from None
        except smtplib.SMTPResponseException as exc:
            raise NotificationError(
                f"{self.server} refused STARTTLS: {_answer(exc.smtp_code, exc.smtp_error)}"
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise NotificationError(
                f"STARTTLS with {self.server} failed: {exc or exc.__class__.__name__}"
            ) from None

    def _login(self, smtp: smtplib.SMTP) -> None:
        s = self.settings
        try:
            smtp.login(s.username, s.password or "")
        except smtplib.SMTPAuthenticationError as exc:
            raise PermanentNotificationError(
                f"{self.server} refused the login of {s.username}: "
                f"{_answer(exc.smtp_code, exc.smtp_error)}; check username and password"
            ) from None
        except smtplib.SMTPNotSupportedError:
            hint = (
                ""
                if s.starttls or s.implicit_tls
                else " (many servers offer it only after STARTTLS)"
            )
            raise PermanentNotificationError(
                f"{self.server} offers no login (AUTH){hint}; remove username and password or "
                "secure the connection"
            ) from None
        except smtplib.SMTPResponseException as exc:
            answer = _answer(exc.smtp_code, exc.smtp_error)
            if exc.smtp_code >= 500:
                raise PermanentNotificationError(
                    f"{self.server} refused the login of {s.username}: {answer}"
                ) from None
            raise NotificationError(f"{self.server} could not log in now: {answer}") from None
        except smtplib.SMTPException as exc:  # no common mechanism
            raise PermanentNotificationError(
                f"login of {s.username} at {self.server} impossible: {exc}"
            ) from None
        except OSError as exc:
            raise NotificationError(
                f"{self.server} dropped the connection during login: {exc}"
            ) from None


def _tls_hint(exc: ssl.SSLCertVerificationError) -> str:
    return (
        f"the server's certificate is not trusted ({exc.verify_message or exc}); if it is "
        "from a private CA, set ca_bundle to that CA"
    )


def _quietly_close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


__all__ = ["EmailNotifier", "build_message"]
