//! Whether traces are exported, and where, from the standard OpenTelemetry
//! variables. Presence reads them itself only to decide whether to export
//! at all and to refuse values it cannot honour; the SDK and the exporter
//! read the rest (service name, resource attributes, headers, timeouts,
//! batching, span limits) as they always do.
//!
//! Traces are off unless an OTLP endpoint is named (or
//! `OTEL_TRACES_EXPORTER=otlp`); `OTEL_SDK_DISABLED=true` and
//! `OTEL_TRACES_EXPORTER=none` turn them off whatever else is set.

/// What the variables ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TracesConfig {
    /// No exporter, no background thread, no per-call work. The reason
    /// goes to the startup log.
    Off {
        reason: &'static str,
    },
    Otlp(Otlp),
}

/// Export over OTLP/gRPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Otlp {
    /// Where spans go, for the startup log: scheme, host and port only
    /// (never a user or password the URL might hold).
    pub endpoint: String,
    /// `OTEL_TRACES_SAMPLER`, or the SDK's default.
    pub sampler: String,
    /// Whether the operator named the service (`OTEL_SERVICE_NAME`, or
    /// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`); if not, it is
    /// `presence` rather than the SDK's `unknown_service`.
    pub service_named: bool,
}

/// A variable whose value Presence cannot honour: the process stops at once
/// and says which, as it does for its own settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?}: {expected}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// The SDK's default when `OTEL_TRACES_SAMPLER` is unset: follow the
/// caller's sampling decision, sample every root.
const DEFAULT_SAMPLER: &str = "parentbased_always_on";

/// The samplers the SDK implements (it would fall back to the default, with
/// a warning, on any other name).
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

impl TracesConfig {
    /// Reads the variables through `var` (the process environment in
    /// production; a map in tests). Empty values count as unset, as the
    /// specification says.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let invalid = |variable: &'static str, value: &str, expected: &'static str| ConfigError {
            variable,
            value: value.to_owned(),
            expected,
        };

        if let Some(value) = get("OTEL_SDK_DISABLED") {
            match value.to_ascii_lowercase().as_str() {
                "true" => {
                    return Ok(Self::Off {
                        reason: "OTEL_SDK_DISABLED=true",
                    });
                }
                "false" => {}
                _ => return Err(invalid("OTEL_SDK_DISABLED", &value, "true or false")),
            }
        }
        let explicit = match get("OTEL_TRACES_EXPORTER") {
            None => false,
            Some(value) => match value.to_ascii_lowercase().as_str() {
                "otlp" => true,
                "none" => {
                    return Ok(Self::Off {
                        reason: "OTEL_TRACES_EXPORTER=none",
                    });
                }
                _ => return Err(invalid("OTEL_TRACES_EXPORTER", &value, "otlp or none")),
            },
        };
        let endpoint = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
            .into_iter()
            .find_map(|name| get(name).map(|value| (name, value)));
        if endpoint.is_none() && !explicit {
            return Ok(Self::Off {
                reason: "no OTEL_EXPORTER_OTLP_ENDPOINT",
            });
        }

        for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
            if let Some(value) = get(name) {
                if value != "grpc" {
                    return Err(invalid(name, &value, "grpc (Presence exports OTLP over gRPC only)"));
                }
                break;
            }
        }
        let endpoint = match endpoint {
            // The exporter's own default.
            None => "http://localhost:4317".to_owned(),
            Some((name, value)) => plain_http_endpoint(&value).ok_or_else(|| {
                invalid(
                    name,
                    &value,
                    "an http:// URL with a host, such as http://otel-collector:4317 \
                     (this build has no TLS for the exporter: send to a collector nearby)",
                )
            })?,
        };

        let sampler = get("OTEL_TRACES_SAMPLER").unwrap_or_else(|| DEFAULT_SAMPLER.to_owned());
        if !SAMPLERS.contains(&sampler.as_str()) {
            return Err(invalid(
                "OTEL_TRACES_SAMPLER",
                &sampler,
                "always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off or parentbased_traceidratio",
            ));
        }
        // Unset, the ratio is 1.
        if sampler.ends_with("traceidratio")
            && let Some(value) = get("OTEL_TRACES_SAMPLER_ARG")
            && !value.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
        {
            return Err(invalid(
                "OTEL_TRACES_SAMPLER_ARG",
                &value,
                "a ratio from 0 to 1, such as 0.01",
            ));
        }

        let service_named = get("OTEL_SERVICE_NAME").is_some()
            || get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
                attributes
                    .split(',')
                    .any(|pair| pair.trim().starts_with("service.name="))
            });
        Ok(Self::Otlp(Otlp {
            endpoint,
            sampler,
            service_named,
        }))
    }
}

/// `http://host[:port][/path]` reduced to what may be logged, or `None` if
/// it is not a plain-HTTP URL with a host.
fn plain_http_endpoint(value: &str) -> Option<String> {
    let uri: http::Uri = value.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let host = uri.host().filter(|host| !host.is_empty())?;
    Some(match uri.port_u16() {
        Some(port) => format!("http://{host}:{port}"),
        None => format!("http://{host}"),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<TracesConfig, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        TracesConfig::from_env(|name| vars.get(name).cloned())
    }

    fn otlp(vars: &[(&str, &str)]) -> Otlp {
        match config(vars) {
            Ok(TracesConfig::Otlp(otlp)) => otlp,
            other => panic!("{vars:?} gave {other:?}"),
        }
    }

    fn off(vars: &[(&str, &str)]) -> &'static str {
        match config(vars) {
            Ok(TracesConfig::Off { reason }) => reason,
            other => panic!("{vars:?} gave {other:?}"),
        }
    }

    fn refused(vars: &[(&str, &str)]) -> &'static str {
        match config(vars) {
            Err(error) => error.variable,
            other => panic!("{vars:?} gave {other:?}"),
        }
    }

    #[test]
    fn with_no_variables_traces_are_off() {
        assert_eq!(off(&[]), "no OTEL_EXPORTER_OTLP_ENDPOINT");
    }

    #[test]
    fn other_otel_variables_alone_do_not_turn_traces_on() {
        let reason = off(&[
            ("OTEL_SERVICE_NAME", "presence-eu"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
        ]);
        assert_eq!(reason, "no OTEL_EXPORTER_OTLP_ENDPOINT");
    }

    #[test]
    fn an_endpoint_turns_traces_on_with_the_sdks_default_sampler() {
        let otlp = otlp(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")]);
        assert_eq!(otlp.endpoint, "http://collector:4317");
        assert_eq!(otlp.sampler, "parentbased_always_on");
        assert!(!otlp.service_named);
    }

    #[test]
    fn the_traces_endpoint_wins_over_the_general_one() {
        let otlp = otlp(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ]);
        assert_eq!(otlp.endpoint, "http://traces:4317");
    }

    #[test]
    fn the_exporter_alone_turns_traces_on_towards_localhost() {
        let otlp = otlp(&[("OTEL_TRACES_EXPORTER", "otlp")]);
        assert_eq!(otlp.endpoint, "http://localhost:4317");
    }

    #[test]
    fn sdk_disabled_or_exporter_none_wins_over_an_endpoint() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(
            off(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]),
            "OTEL_SDK_DISABLED=true"
        );
        assert_eq!(
            off(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            "OTEL_TRACES_EXPORTER=none"
        );
        otlp(&[endpoint, ("OTEL_SDK_DISABLED", "false")]);
    }

    #[test]
    fn values_presence_cannot_honour_are_refused_by_name() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(refused(&[("OTEL_SDK_DISABLED", "yes")]), "OTEL_SDK_DISABLED");
        assert_eq!(refused(&[("OTEL_TRACES_EXPORTER", "zipkin")]), "OTEL_TRACES_EXPORTER");
        assert_eq!(
            refused(&[("OTEL_TRACES_EXPORTER", "otlp,console")]),
            "OTEL_TRACES_EXPORTER"
        );
        assert_eq!(
            refused(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
            "OTEL_EXPORTER_OTLP_PROTOCOL"
        );
        assert_eq!(
            refused(&[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")]),
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        );
        assert_eq!(
            refused(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")]),
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        );
        assert_eq!(
            refused(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317")]),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        );
        assert_eq!(
            refused(&[endpoint, ("OTEL_TRACES_SAMPLER", "sometimes")]),
            "OTEL_TRACES_SAMPLER"
        );
        assert_eq!(
            refused(&[
                endpoint,
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5")
            ]),
            "OTEL_TRACES_SAMPLER_ARG"
        );
    }

    #[test]
    fn a_protocol_of_grpc_and_a_ratio_sampler_are_accepted() {
        let otlp = otlp(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]);
        assert_eq!(otlp.sampler, "traceidratio");
    }

    #[test]
    fn the_logged_endpoint_never_holds_a_password() {
        let otlp = otlp(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://user:secret@collector:4317/v1")]);
        assert_eq!(otlp.endpoint, "http://collector:4317");
    }

    #[test]
    fn a_named_service_is_noticed_either_way() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert!(otlp(&[endpoint, ("OTEL_SERVICE_NAME", "presence-eu")]).service_named);
        assert!(
            otlp(&[
                endpoint,
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod, service.name=p"
                )
            ])
            .service_named
        );
        assert!(!otlp(&[endpoint, ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")]).service_named);
    }
}
