"""Credentials presented to the device listeners other than a client certificate:
access tokens with their proofs, and SAS tokens. One place turns what a request or a
CONNECT carries into an :class:`Admission` (through the gate) or a :class:`Refused`;
HTTPS and MQTT only say where they found it. Wire formats: docs/credentials.md.

Order matters for the replay cache: a proof is checked (and its ``jti`` spent) only
after the access token it accompanies verified, so only holders of valid tokens can
fill the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from fleetward.crypto.sas import SasRefused, is_sas, parse_sas
from fleetward.edge.channel import Admission, Refusal, Refused
from fleetward.edge.gate import TrustGate
from fleetward.model import DEVICE_ID_PATTERN
from fleetward.tokens.access import AccessToken, AccessTokenVerifier, TokenRefused
from fleetward.tokens.dpop import ANY_HOST, ProofVerifier, TargetUri

# MQTT 5.0 §4.12 enhanced authentication method of access tokens (docs/credentials.md).
TOKEN_AUTH_METHOD = "FW-TOKEN"
MQTT_PROOF_METHOD = "CONNECT"  # the proof's htm on MQTT
MAX_PASSWORD_BYTES = 16384  # a token and a proof are ~1.5 KiB together


@dataclass(frozen=True, slots=True)
class HttpRefused:
    """A refused HTTP credential: the gate's refusal plus the RFC 6750 §3 / RFC 9449 §7.1
    challenge to send back (``WWW-Authenticate``)."""

    refused: Refused
    scheme: str  # Bearer | DPoP | SharedAccessSignature
    error: str  # invalid_token | invalid_dpop_proof | invalid_request

    @property
    def challenge(self) -> str:
        reason = self.refused.reason.replace("\\", "\\\\").replace('"', "'")
        extra = ' algs="ES256"' if self.scheme == "DPoP" else ""
        return f'{self.scheme} error="{self.error}", error_description="{reason}"{extra}'


class PresentedCredentials:
    """Args:
        gate: admits the device behind a verified credential (and audits refusals).
        verifier: checks access tokens.
        proofs: checks DPoP and CONNECT proofs.
        mqtt_port: the port devices reach the MQTT listener on (a CONNECT proof's htu).
    """

    def __init__(self, gate: TrustGate, verifier: AccessTokenVerifier,
                 proofs: ProofVerifier, mqtt_port: int) -> None:
        self.gate = gate
        self.verifier = verifier
        self.proofs = proofs
        self.mqtt_target = TargetUri("mqtts", ANY_HOST, mqtt_port, "/")

    # --- HTTPS ----------------------------------------------------------------------------

    def http(self, authorization: str, dpop: list[str], *, method: str, target: TargetUri,
             peer_der: bytes | None, source: str) -> Admission | HttpRefused:
        """Admit the sender of one request by its ``Authorization`` header."""
        scheme, _, value = authorization.partition(" ")
        kind = scheme.lower()
        if is_sas(authorization):
            return self._http_sas(authorization, source)
        if kind not in ("bearer", "dpop") or not value:
            return self._http_refuse(
                "Bearer", "invalid_request",
                "unknown Authorization scheme: use Bearer, DPoP or SharedAccessSignature "
                "(or no header and the client certificate)", source)
        shown = "DPoP" if kind == "dpop" else "Bearer"
        token = self._verify(value, source, "https")
        if isinstance(token, Refused):
            return HttpRefused(token, shown, "invalid_token")
        if kind == "bearer":
            if token.binding == "jkt":
                # RFC 9449 §7.1: a DPoP-bound token sent as a bearer token is refused.
                return self._http_refuse("DPoP", "invalid_token",
                                         "this token is DPoP-bound: send Authorization: "
                                         "DPoP <token> with a DPoP proof", source,
                                         token.device_id)
            verdict = self.gate.admit_token(token, channel="https", source=source,
                                            peer_der=peer_der)
        else:
            if token.binding != "jkt":
                return self._http_refuse("DPoP", "invalid_token",
                                         "this token is not DPoP-bound: send it as "
                                         "Authorization: Bearer", source, token.device_id)
            if len(dpop) != 1:
                return self._http_refuse("DPoP", "invalid_dpop_proof",
                                         "send exactly one DPoP header with the proof "
                                         "(RFC 9449 §4.3)", source, token.device_id)
            standing = self.gate.token_standing(token, channel="https", source=source)
            if standing is not None:
                return HttpRefused(standing, "DPoP", "invalid_token")
            try:
                proof = self.proofs.verify(dpop[0], method=method, target=target,
                                           access_token=value)
            except TokenRefused as exc:
                return self._http_refuse("DPoP", "invalid_dpop_proof", exc.reason, source,
                                         token.device_id)
            verdict = self.gate.admit_token(token, channel="https", source=source,
                                            peer_der=peer_der, proof_jkt=proof.jkt)
        if isinstance(verdict, Refused):
            return HttpRefused(verdict, shown, "invalid_token")
        return verdict

    def _http_sas(self, authorization: str, source: str) -> Admission | HttpRefused:
        try:
            sas = parse_sas(authorization)
        except SasRefused as exc:
            return self._http_refuse("SharedAccessSignature", "invalid_token", exc.reason,
                                     source)
        device_id = sas.resource.rstrip("/").rsplit("/", 1)[-1]
        if not DEVICE_ID_PATTERN.fullmatch(device_id):
            return self._http_refuse("SharedAccessSignature", "invalid_token",
                                     "the SAS resource must be <host>/devices/<device id>",
                                     source)
        verdict = self.gate.admit_sas(device_id, sas, channel="https", source=source)
        if isinstance(verdict, Refused):
            return HttpRefused(verdict, "SharedAccessSignature", "invalid_token")
        return verdict

    def _http_refuse(self, scheme: str, error: str, reason: str, source: str,
                     device_id: str | None = None) -> HttpRefused:
        refused = self.gate.refuse(Refusal.BAD_CREDENTIALS, reason, "https", source,
                                   device_id)
        return HttpRefused(refused, scheme, error)

    # --- MQTT -----------------------------------------------------------------------------

    def mqtt_password(self, username: str | None, password: bytes, *, client_id: str,
                      peer_der: bytes | None, source: str) -> Admission | Refused | None:
        """Admit a CONNECT by what its password carries: a SAS token, an access token, or
        an access token and its proof. None when the password is none of these (a client
        with a certificate may send any other user name and password; the certificate
        decides). A password shaped like a token is a token: it is verified, and refused
        if it does not verify — a bad credential never falls back to another one.
        """
        if len(password) > MAX_PASSWORD_BYTES:
            return self.gate.refuse(Refusal.BAD_CREDENTIALS, "the password is too long",
                                    "mqtt", source, None)
        try:
            text = password.decode("ascii")
        except UnicodeDecodeError:
            return None
        if is_sas(text):
            try:
                sas = parse_sas(text)
            except SasRefused as exc:
                return self.gate.refuse(Refusal.BAD_CREDENTIALS, exc.reason, "mqtt", source,
                                        None)
            device_id = _device_of_username(username) or client_id
            return self.gate.admit_sas(device_id, sas, channel="mqtt", source=source,
                                       client_id=client_id)
        parts = text.split(" ")
        if len(parts) > 2 or parts[0].count(".") != 2:
            return None
        token = self._verify(parts[0], source, "mqtt")
        if isinstance(token, Refused):
            return token
        if username and username != token.device_id:
            return self.gate.refuse(Refusal.BAD_CREDENTIALS,
                                    "the user name must be the device id the token names",
                                    "mqtt", source, token.device_id)
        proof_jkt = None
        if len(parts) == 2:
            standing = self.gate.token_standing(token, channel="mqtt", source=source)
            if standing is not None:
                return standing
            try:
                proof_jkt = self.proofs.verify(parts[1], method=MQTT_PROOF_METHOD,
                                               target=self.mqtt_target,
                                               access_token=parts[0]).jkt
            except TokenRefused as exc:
                return self.gate.refuse(Refusal.BAD_CREDENTIALS, exc.reason, "mqtt", source,
                                        token.device_id)
        return self.gate.admit_token(token, channel="mqtt", source=source,
                                     client_id=client_id, peer_der=peer_der,
                                     proof_jkt=proof_jkt)

    def mqtt_token(self, data: bytes | None, source: str) -> tuple[AccessToken, str] | Refused:
        """Step 1 of ``FW-TOKEN``: the access token in the Authentication Data."""
        try:
            text = (data or b"").decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if not text:
            return self.gate.refuse(Refusal.BAD_CREDENTIALS,
                                    f"{TOKEN_AUTH_METHOD}: the Authentication Data must be "
                                    "the access token", "mqtt", source, None)
        token = self._verify(text, source, "mqtt")
        if isinstance(token, Refused):
            return token
        # A revoked token gets no challenge (and spends nothing).
        standing = self.gate.token_standing(token, channel="mqtt", source=source)
        return standing if standing is not None else (token, text)

    def mqtt_admit(self, token: AccessToken, token_text: str, *, client_id: str,
                   peer_der: bytes | None, source: str, proof: bytes | None = None,
                   challenge: bytes | None = None) -> Admission | Refused:
        """Step 2 of ``FW-TOKEN``: admit with the proof that answered ``challenge``
        (key-bound tokens), or without one (certificate-bound over mTLS, unbound)."""
        proof_jkt = None
        if proof is not None:
            try:
                # The token may have expired or been revoked while the client answered
                # the challenge (a session must not open only to end at once).
                self.verifier.verify(token_text)
            except TokenRefused as exc:
                return self.gate.refuse(Refusal.BAD_CREDENTIALS, exc.reason, "mqtt", source,
                                        token.device_id)
            standing = self.gate.token_standing(token, channel="mqtt", source=source)
            if standing is not None:
                return standing
            try:
                proof_jkt = self.proofs.verify(proof.decode("ascii"), method=MQTT_PROOF_METHOD,
                                               target=self.mqtt_target,
                                               access_token=token_text, nonce=challenge).jkt
            except (TokenRefused, UnicodeDecodeError) as exc:
                reason = exc.reason if isinstance(exc, TokenRefused) else "not ASCII"
                return self.gate.refuse(Refusal.BAD_CREDENTIALS, f"proof: {reason}", "mqtt",
                                        source, token.device_id)
        return self.gate.admit_token(token, channel="mqtt", source=source,
                                     client_id=client_id, peer_der=peer_der,
                                     proof_jkt=proof_jkt)

    def _verify(self, token: str, source: str, channel: str) -> AccessToken | Refused:
        try:
            return self.verifier.verify(token)
        except TokenRefused as exc:
            return self.gate.refuse(Refusal.BAD_CREDENTIALS, exc.reason, channel, source,
                                    None)


def request_target(request: web.Request) -> TargetUri:
    """The URI a request was sent to, as a DPoP proof's ``htu`` names it: the scheme and
    the ``Host`` the client used, the path without the query (RFC 9449 §4.3 point 9).

    Raises:
        ValueError: no usable ``Host`` header.
    """
    host = request.headers.get("Host", "")
    return TargetUri.parse(f"https://{host}{request.raw_path.split('?')[0]}")


def _device_of_username(username: str | None) -> str | None:
    """The device id in a user name: the name itself, or the second part of Azure IoT
    Hub's ``<host>/<device id>/?api-version=…``."""
    if not username:
        return None
    if "/" in username:
        parts = username.split("/")
        return parts[1] if len(parts) >= 2 and parts[1] else None
    return username
