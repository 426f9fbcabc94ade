//! The agent as a Windows service: `beckon agent install-service` registers it with the
//! service control manager (automatic start, LocalSystem, restarted 10 s after a failure, up to
//! three times a day), `uninstall-service` stops and removes it, and `agent service` is what
//! the manager starts: the agent, stopped by the manager's Stop and Shutdown, logging to
//! `%ProgramData%\Beckon\agent.log`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// The service's name (`sc query BeckonAgent`).
pub const SERVICE_NAME: &str = "BeckonAgent";
const DISPLAY_NAME: &str = "Beckon agent";
const DESCRIPTION: &str =
    "Keeps the push connection to the Beckon service and acts on signed wake-up calls.";

/// The manager's Stop or Shutdown, for [`super::wait_for_stop_signal`].
pub(crate) fn stop_requested() -> &'static tokio::sync::Notify {
    static STOP: OnceLock<tokio::sync::Notify> = OnceLock::new();
    STOP.get_or_init(tokio::sync::Notify::new)
}

/// Registers the agent as an automatic-start service running `beckon agent service --config
/// <config>` (this executable) as LocalSystem, restarted after a failure.
pub fn install(config: &Path) -> anyhow::Result<()> {
    let config = std::path::absolute(config).unwrap_or_else(|_| config.to_owned());
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("cannot open the service control manager; run from an elevated prompt")?;
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: std::env::current_exe().context("cannot find this program's path")?,
        launch_arguments: vec![
            "agent".into(),
            "service".into(),
            "--config".into(),
            config.clone().into_os_string(),
        ],
        dependencies: vec![],
        // None: LocalSystem.
        account_name: None,
        account_password: None,
    };
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
        .with_context(|| format!("cannot create the service {SERVICE_NAME}"))?;
    service.set_description(DESCRIPTION)?;
    let restart = ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(10),
    };
    service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 3600)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![restart.clone(), restart.clone(), restart]),
    })?;
    // Also restart after the agent stopped with an error (not only after a crash). Wine has
    // no such setting: say so and go on.
    if let Err(e) = service.set_failure_actions_on_non_crash_failures(true) {
        eprintln!("warning: restart only after a crash, not after an error exit: {e}");
    }
    println!(
        "installed the service {SERVICE_NAME} (automatic start, LocalSystem) with {}",
        config.display()
    );
    println!("start it now: sc start {SERVICE_NAME}");
    Ok(())
}

/// Stops the service if it runs, and removes it.
pub fn uninstall() -> anyhow::Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the service control manager; run from an elevated prompt")?;
    let service = manager
        .open_service(
            SERVICE_NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .with_context(|| format!("no service {SERVICE_NAME} to remove"))?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        service.stop().context("cannot stop the service")?;
    }
    service.delete().context("cannot remove the service")?;
    println!("removed the service {SERVICE_NAME}");
    Ok(())
}

static CONFIG: OnceLock<PathBuf> = OnceLock::new();

/// What the service control manager starts: hands this thread to the manager, which runs the
/// agent in [`service_main`]; returns when the service stopped.
pub fn run(config: PathBuf) -> anyhow::Result<()> {
    let _ = CONFIG.set(config);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main).context(
        "cannot reach the service control manager: `agent service` is started by Windows; \
         run `beckon agent run` from a prompt",
    )
}

define_windows_service!(ffi_service_main, service_main);

fn service_main(_arguments: Vec<OsString>) {
    if let Err(e) = run_service() {
        tracing::error!(error = %format!("{e:#}"), "the agent service failed");
    }
}

fn status(state: ServiceState, exit_code: u32) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: ServiceExitCode::Win32(exit_code),
        checkpoint: 0,
        wait_hint: Duration::from_secs(10),
        process_id: None,
    }
}

fn run_service() -> anyhow::Result<()> {
    let handle = service_control_handler::register(SERVICE_NAME, |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            stop_requested().notify_one();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })?;
    handle.set_service_status(status(ServiceState::Running, 0))?;
    let config = CONFIG
        .get()
        .cloned()
        .unwrap_or_else(super::default_config_file);
    let _log = log_to_file(&super::default_state_dir().join("agent.log"));
    let result = crate::run(crate::AgentCommand::Run { config });
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "the agent stopped with an error");
    }
    // A non-zero exit code makes the manager apply the restart actions.
    handle.set_service_status(status(ServiceState::Stopped, u32::from(result.is_err())))?;
    Ok(())
}

/// A service has no console: the log goes to a file (appended), as operators expect under
/// ProgramData. `RUST_LOG` still sets the level. The program's global log (to stderr) is
/// already set, so this one is this thread's, where the agent's runtime runs, for as long as
/// the returned guard lives.
fn log_to_file(path: &Path) -> Option<tracing::subscriber::DefaultGuard> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // Write access and the end of the file rather than append-only access, which Wine's
    // files do not take; the service is the file's only writer.
    let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
    else {
        return None;
    };
    let _ = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .finish();
    Some(tracing::subscriber::set_default(subscriber))
}
